"""What bench/gpu-check.sh measured on a lent GPU, packed so that one device call brings it all back, and unpacked here.

    python -m movielm_fast.bench.gpu_check start WORK --mode full      # there, first: WORK/provenance.json
    python -m movielm_fast.bench.gpu_check pack WORK OUT [--frames]    # there, after every step
    python -m movielm_fast.bench.gpu_check unpack OUT/gpu-check.tgz   # here: into bench/results/, RESULTS.md anew

A device returns at most 8 files from its $OUT, no more than 2 folders down, 16 MiB each (docs/gpu.md). So the
script makes its files in a folder of its own (WORK) and, after every step, `pack` moves whatever was left in OUT
(the finished step's log, say) into WORK and writes everything in WORK into OUT/gpu-check.tgz, anew and atomically:
a call cut short still returns every finished step. OUT keeps only the archive and the files worth reading at once
(steps.log, goals.log), which are packed too. Frames (rendered images) are left out unless asked for, and any file
that would take the archive over its budget is left out and named in the archive's `left-out.json`.

`unpack` moves the benchmark results (what the run wrote directly under `results/`) into bench/results/, where
bench/RESULTS.md reads them, keeps the rest (logs, provenance, RESULTS.md as written there) in a folder of its own
beside them with a PROVENANCE.md (card, date, commit), and regenerates RESULTS.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_bytes, atomic_write_text, sha256_file

from .args import bench_parser

ARCHIVE = "gpu-check.tgz"
AT_ONCE = ("steps.log", "goals.log")  # stay in OUT beside the archive: what a reader wants first
PROVENANCE = "provenance.json"
LEFT_OUT = "left-out.json"
RESULTS_DIR = "results"  # the run's benchmark results: what unpack moves into bench/results/
# Well under the device's 16 MiB a file. Sizes are counted uncompressed, so the archive stays under it for sure.
BUDGET = 12 << 20
IMAGES = {".png", ".jpg", ".jpeg", ".webp"}
# How a GPU run is done, in three lines: the top of bench/RESULTS.md (report.py) and of docs/gpu.md.
HOW_TO = (
    "1. Here: `bash bench/gpu-check.sh --prepare` puts the wheels a bare GPU image lacks into `wheels/` (git-ignored).",
    "2. There, in one device call from the repository root with `wheels/` carried: `bash bench/gpu-check.sh` "
    "(`--lossy` in a call of its own) returns `gpu-check.tgz`, `steps.log` and `goals.log`.",
    "3. Here: `python -m movielm_fast.bench.gpu_check unpack gpu-check.tgz` moves its results into `bench/results/`, "
    "keeps its logs and provenance (card, date, commit) beside them, and regenerates `bench/RESULTS.md`.")


def _is_frame(rel: PurePosixPath) -> bool:
    """A rendered image: an image file at least two folders down (results/<run>/*.png, render/<movie>/...). A plot
    beside its result (results/<run>.png) is not a frame."""
    return rel.suffix.lower() in IMAGES and len(rel.parts) > 2


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def start(work: Path, mode: str) -> dict[str, Any]:
    """WORK/provenance.json: the card (nvidia-smi's name for the first GPU), the date, the commit (git's, else the
    GIT_COMMIT variable: a device may get the tree without its .git) and whether the tree had uncommitted changes."""
    commit = _run("git", "rev-parse", "HEAD")
    cards = _run("nvidia-smi", "--query-gpu=name", "--format=csv,noheader").splitlines()
    prov = {"card": cards[0].strip() if cards else None, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": commit or os.environ.get("GIT_COMMIT") or None, "mode": mode,
            "dirty": bool(_run("git", "status", "--porcelain", "--untracked-files=no")) if commit else None}
    atomic_write_text(work / PROVENANCE, json.dumps(prov, indent=1) + "\n")
    return prov


def _sweep(out: Path, work: Path) -> None:
    """Every file of OUT into WORK at the same relative path, but the archive. The at-once files are copied and
    stay: the script goes on appending to them there."""
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if rel.as_posix() == ARCHIVE or rel.name.startswith(f".{ARCHIVE}."):  # the archive, or its temporary
            continue
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() in AT_ONCE:
            shutil.copyfile(path, dest)
        else:
            os.replace(path, dest)
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def pack(work: Path, out: Path, frames: bool = False) -> dict[str, str]:
    """Everything the run has made so far -> OUT/gpu-check.tgz (see the module's doc). Returns what was left out
    (relative path -> why), which the archive also holds as left-out.json."""
    out.mkdir(parents=True, exist_ok=True)
    _sweep(out, work)
    files = sorted((p for p in work.rglob("*") if p.is_file()), key=lambda p: (_is_frame(p.relative_to(work)), p))
    left_out: dict[str, str] = {}
    total = 0
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in files:  # frames last: they are the first thing to give up when the budget runs out
            rel = PurePosixPath(path.relative_to(work).as_posix())
            size = path.stat().st_size
            if _is_frame(rel) and not frames:
                left_out[str(rel)] = "a frame (FRAMES=1 packs frames)"
            elif total + size > BUDGET:
                left_out[str(rel)] = f"{size} bytes: over the archive's budget ({BUDGET} bytes uncompressed)"
            else:
                tar.add(path, arcname=str(rel), recursive=False)
                total += size
        note = (json.dumps(left_out, indent=1) + "\n").encode()
        info = tarfile.TarInfo(LEFT_OUT)
        info.size, info.mtime = len(note), int(time.time())
        tar.addfile(info, io.BytesIO(note))
    atomic_write_bytes(out / ARCHIVE, buf.getvalue())
    return left_out


# --- here: unpack ------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _provenance(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    """The archive's provenance.json, checked: its date and card become a folder's name."""
    try:
        prov = json.load(tar.extractfile(PROVENANCE))  # type: ignore[arg-type]
    except (KeyError, ValueError):
        prov = None
    if not isinstance(prov, dict) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(prov.get("date"))):
        raise UserError(f"{archive} holds no readable {PROVENANCE}: it was not made by bench/gpu-check.sh",
                        "unpack the gpu-check.tgz that a run of bench/gpu-check.sh left in its OUT folder")
    return prov


def unpack(archive: Path, results: Path, commit: str | None = None) -> Path:
    """The archive's results into `results`, the rest into results/gpu-check-<date>-<card>/ with PROVENANCE.md;
    then bench/RESULTS.md (results/../RESULTS.md) is regenerated. Returns that folder. Everything is checked before
    anything moves: the folder already there, or a different file of a result's name, is an error."""
    archive, results = Path(archive), Path(results)
    try:
        tar = tarfile.open(archive, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise UserError(f"cannot read {archive} as a gzipped tar archive: {exc}",
                        "pass the gpu-check.tgz that the device call returned") from None
    with tar, tempfile.TemporaryDirectory(prefix=".gpu-check-", dir=_made(results)) as tmp:
        prov = _provenance(tar, archive)
        prov["commit"] = prov.get("commit") or commit
        if not prov["commit"]:
            raise UserError(f"{archive} records no commit (the device had no git and no GIT_COMMIT was set)",
                            "pass --commit with the commit the device ran")
        stamp = prov["date"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
        dest = results / f"gpu-check-{stamp}-{_slug(prov.get('card') or 'unknown card')}"
        if dest.exists():
            raise UserError(f"{dest} exists: this archive was unpacked already",
                            f"delete {dest} (and the result files it lists) to unpack it again")
        staged = Path(tmp, "run")
        tar.extractall(staged, filter="data")  # no absolute paths, no '..', no links out, no devices
        made = sorted((staged / RESULTS_DIR).glob("*"))
        clashes = [p.name for p in made if (results / p.name).exists() and not _same(p, results / p.name)]
        if clashes:
            raise UserError(f"{results} already has different files named {', '.join(clashes)}",
                            "move them away, or unpack into another folder with --results")
        if (staged / "RESULTS.md").exists():  # as the run regenerated it there, from that run's results alone
            os.replace(staged / "RESULTS.md", staged / "RESULTS-as-written.md")
        atomic_write_text(staged / "PROVENANCE.md", _provenance_md(prov, archive, [p.name for p in made]))
        os.replace(staged, dest)
    for path in made:  # a result already there is the same file, from an unpack of a copy of this archive
        kept = dest / RESULTS_DIR / path.name
        if not (results / path.name).exists():
            os.replace(kept, results / path.name)
        else:
            shutil.rmtree(kept) if kept.is_dir() else kept.unlink()
    if (dest / RESULTS_DIR).is_dir() and not any((dest / RESULTS_DIR).iterdir()):
        (dest / RESULTS_DIR).rmdir()
    from .report import write_results_md  # brings torch and every benchmark's module: only here, never there

    write_results_md(results, results.parent / "RESULTS.md")
    return dest


def _made(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder}: {exc.strerror or exc}", "pass a writable folder with --results") \
            from None
    return folder


def _same(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and sha256_file(a) == sha256_file(b)


def _provenance_md(prov: dict[str, Any], archive: Path, moved: list[str]) -> str:
    dirty = {True: " (with uncommitted changes)", False: "", None: " (whether the tree was clean is not known)"}
    return "\n".join([
        f"# bench/gpu-check.sh on {prov.get('card') or 'an unnamed card'}, {prov['date']}: provenance", "",
        f"- card: {prov.get('card') or 'not recorded (nvidia-smi gave no name)'}",
        f"- date (UTC, the run's start): {prov['date']}",
        f"- commit: {prov['commit']}{dirty.get(prov.get('dirty'), '')}",
        f"- mode: {prov.get('mode')}",
        f"- archive: {archive.name}, sha256 {sha256_file(archive)}", "",
        "Unpacked with `python -m movielm_fast.bench.gpu_check unpack`. The benchmark results were moved one folder "
        "up, into bench/results/, where `python -m movielm_fast.bench.report` puts them in bench/RESULTS.md: "
        + (", ".join(f"`{n}`" for n in moved) if moved else "none (no step wrote a result)") + ". "
        "Here stay the logs (one per step; steps.log says which finished and how), RESULTS.md as the run "
        f"regenerated it from its own results (RESULTS-as-written.md), and {LEFT_OUT}: what the packing left out "
        "(frames unless FRAMES=1, files over its budget). cuda_knobs.json is the CUDA knob table the run ended with "
        "(rewritten by a KNOBS=1 run): copy it into src/movielm_fast/engine/ to adopt it.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("gpu_check", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    st = sub.add_parser("start", help="there, first: WORK/provenance.json (card, date, commit)")
    st.add_argument("work", type=Path)
    st.add_argument("--mode", default="full", help="which run of gpu-check.sh: full, quick or lossy")
    pk = sub.add_parser("pack", help="there, after every step: WORK (and what OUT holds) -> OUT/gpu-check.tgz")
    pk.add_argument("work", type=Path)
    pk.add_argument("out", type=Path)
    pk.add_argument("--frames", action="store_true", help="pack the rendered frames too, as far as the budget goes")
    up = sub.add_parser("unpack", help="here: an archive into bench/results/ with its provenance; RESULTS.md anew")
    up.add_argument("archive", type=Path)
    up.add_argument("--results", type=Path, default=None, help="folder of result JSON files (default bench/results)")
    up.add_argument("--commit", help="the commit the device ran, where the archive records none")
    args = ap.parse_args(argv)
    try:
        if args.command == "start":
            print(json.dumps(start(args.work, args.mode)))
        elif args.command == "pack":
            left = pack(args.work, args.out, args.frames)
            print(f"packed {args.out / ARCHIVE} ({(args.out / ARCHIVE).stat().st_size} bytes; {len(left)} files "
                  f"left out: {LEFT_OUT})")
        else:
            from .hardware import RESULTS  # torch: only here

            print(unpack(args.archive, args.results or RESULTS, args.commit))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
