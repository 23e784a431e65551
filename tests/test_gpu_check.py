"""bench/gpu-check.sh brings back everything it measured although a device returns at most 8 files from $OUT (no
more than 2 folders down, 16 MiB each): its packing, the script's steps around it (with a stand-in Python, on CPU),
and the unpacking of an archive into bench/results/ with its provenance."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from movielm_fast.bench import gpu_check
from movielm_fast.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu-check.sh"
H200 = REPO / "bench" / "results" / "20261204-155006-cuda-nvidia-h200"  # a real GPU result, .json and .csv


def _script(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(tmp_path),
           "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), **env}
    res = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _returned(out: Path) -> set[str]:
    """What the device brings back of OUT, checked against its limits."""
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.parts) <= 3 and (out / p).stat().st_size < 16 << 20 for p in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.parts), files
    return {p.as_posix() for p in files}


def _archived(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / gpu_check.ARCHIVE) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_packing_a_dozen_files_brings_them_all_back(tmp_path):
    """What the script used to leave in $OUT — logs, a plan, render/ three folders down, a JSON and a CSV per
    benchmark run — packed by the script's own packing: OUT keeps the archive and the two files to read at once."""
    out = tmp_path / "out"
    made = {name: f"{name}: made on the GPU\n".encode() for name in (
        "steps.log", "install.log", "env.log", "bench-sd15.log", "fp16-range.log", "tests-gpu.log", "one-frame.json",
        "render-1.log", "render-2.log", "goals.log", "cuda_knobs.json", "RESULTS.md", "render/ttfi/manifest.json",
        "results/20261210-100000-cuda-nvidia-h200.json", "results/20261210-100000-cuda-nvidia-h200.csv")}
    frames = {"render/ttfi/frames/001.png": os.urandom(3000),
              "results/20261210-100000-cuda-nvidia-h200/sd15-arch-torch-512x512-b1.png": os.urandom(3000)}
    for name, data in {**made, **frames}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    assert len(made) + len(frames) > 12

    _script(["--pack"], tmp_path)
    assert _returned(out) == {"gpu-check.tgz", "steps.log", "goals.log"}
    archived = _archived(out)
    assert {k: v for k, v in archived.items() if k != gpu_check.LEFT_OUT} == made
    assert set(json.loads(archived[gpu_check.LEFT_OUT])) == set(frames)  # left out, and said so

    _script(["--pack"], tmp_path, FRAMES="1")  # asked for, frames come too
    assert _returned(out) == {"gpu-check.tgz", "steps.log", "goals.log"}
    archived = _archived(out)
    assert {k: v for k, v in archived.items() if k != gpu_check.LEFT_OUT} == {**made, **frames}
    assert json.loads(archived[gpu_check.LEFT_OUT]) == {}


def test_packing_keeps_the_archive_under_its_budget(tmp_path, monkeypatch):
    """A file that would take the archive over its budget is left out and named; frames go first."""
    monkeypatch.setattr(gpu_check, "BUDGET", 10_000)
    work, out = tmp_path / "work", tmp_path / "out"
    for name, size in (("steps.log", 100), ("a.log", 4000), ("huge.log", 20_000), ("render/m/frames/1.png", 3000),
                       ("render/m/frames/2.png", 3000)):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(os.urandom(size))
    left = gpu_check.pack(work, out, frames=True)
    assert set(_archived(out)) == {"steps.log", "a.log", "render/m/frames/1.png", gpu_check.LEFT_OUT}
    assert set(left) == {"huge.log", "render/m/frames/2.png"} and "budget" in left["huge.log"]
    assert (out / gpu_check.ARCHIVE).stat().st_size <= 10_000


# A stand-in for Python on a GPU machine: the packing runs for real; every other command records what the archive
# held when it began (and which step was running), and writes a result and a frame where it was told to.
STANDIN = """#!{python}
import json, os, subprocess, sys, tarfile
from pathlib import Path

args = sys.argv[1:]
if args[:2] == ["-m", "movielm_fast.bench.gpu_check"]:
    sys.exit(subprocess.call([{python!r}, *args]))
out = Path(os.environ["OUT"])
archive = out / "gpu-check.tgz"
held = tarfile.open(archive).getnames() if archive.exists() else []
started = [line[3:].split(" (")[0] for line in (out / "steps.log").read_text().splitlines() if line.startswith("== ")]
with open(os.environ["TRACE"], "a") as fp:
    fp.write(json.dumps({{"step": started[-1], "before": started[:-1], "held": held}}) + "\\n")
if args[:1] == ["-c"]:
    print("/models/sd15-arch")
for flag in ("--out", "--results"):
    if flag in args:
        folder = Path(args[args.index(flag) + 1])
        stem = started[-1] + "-result"
        (folder / stem).mkdir(parents=True, exist_ok=True)
        (folder / (stem + ".json")).write_text("{{}}")
        (folder / stem / "frame.png").write_bytes(b"png")
"""


@pytest.mark.parametrize("mode", ["full", "lossy"])
def test_the_script_packs_after_every_step(tmp_path, mode):
    """The whole script on CPU with the stand-in: every command finds in the archive the logs of every step
    before it (a call killed at any point returns all finished steps), and at the end OUT holds the archive with
    every step's log, the results and the provenance, beside steps.log (and goals.log)."""
    standin = tmp_path / "python"
    standin.write_text(STANDIN.format(python=sys.executable))
    standin.chmod(0o755)
    trace = tmp_path / "trace.jsonl"
    _script([] if mode == "full" else ["--lossy"], tmp_path, PY=str(standin), TRACE=str(trace))
    out = tmp_path / "out"

    steps = [line[3:].split(" (")[0] for line in (out / "steps.log").read_text().splitlines()
             if line.startswith("== ")]
    assert steps[0] == "install" and (out / "steps.log").read_text().splitlines()[-1].startswith("done")
    calls = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {c["step"] for c in calls} >= set(steps)  # every step ran a command
    for call in calls:
        assert {f"{s}.log" for s in call["before"]} <= set(call["held"]), call

    archived = _archived(out)
    assert _returned(out) == {"gpu-check.tgz", "steps.log"} | ({"goals.log"} if mode == "full" else set())
    assert {f"{s}.log" for s in steps} <= set(archived)
    bench_steps = [s for s in steps if s.startswith(("bench", "fp16", "fp8", "lossy", "peer", "dit"))]
    assert bench_steps and {f"results/{s}-result.json" for s in bench_steps} <= set(archived)
    assert not any(name.endswith(".png") for name in archived)  # frames only when asked for
    prov = json.loads(archived[gpu_check.PROVENANCE])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert prov["mode"] == mode and prov["commit"] == head and prov["date"].endswith("Z")


def _archive(tmp_path: Path, commit: str | None = "0123abc") -> Path:
    """A returned archive as a full run packs it: one bench.gpu result (a real one, renamed), logs, RESULTS.md."""
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    stem = "20261210-100000-cuda-nvidia-h200"
    result = json.loads(H200.with_suffix(".json").read_text())
    result["created"] = "2026-12-10T10:00:00+0000"
    (work / "results" / f"{stem}.json").write_text(json.dumps(result))
    shutil.copyfile(H200.with_suffix(".csv"), work / "results" / f"{stem}.csv")
    for name in ("steps.log", "bench-sd15.log", "RESULTS.md"):
        (work / name).write_text(f"{name} as the run wrote it\n")
    (work / gpu_check.PROVENANCE).write_text(json.dumps(
        {"card": "NVIDIA H200", "date": "2026-12-10T09:58:00Z", "commit": commit, "dirty": False, "mode": "full"}))
    gpu_check.pack(work, tmp_path / "out")
    return tmp_path / "out" / gpu_check.ARCHIVE


def test_unpack_puts_results_in_bench_results_with_provenance_and_regenerates_results_md(tmp_path):
    archive = _archive(tmp_path)
    results = tmp_path / "bench" / "results"
    dest = gpu_check.unpack(archive, results)

    assert dest == results / "gpu-check-20261210-095800-nvidia-h200"
    stem = "20261210-100000-cuda-nvidia-h200"
    assert sorted(p.name for p in results.iterdir()) == sorted([dest.name, f"{stem}.json", f"{stem}.csv"])
    assert (results / f"{stem}.csv").read_bytes() == H200.with_suffix(".csv").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["steps.log", "bench-sd15.log", "RESULTS-as-written.md", "PROVENANCE.md", gpu_check.PROVENANCE,
         gpu_check.LEFT_OUT])
    prov = (dest / "PROVENANCE.md").read_text()
    assert "NVIDIA H200" in prov and "2026-12-10T09:58:00Z" in prov and "commit: 0123abc" in prov
    assert f"`{stem}.json`" in prov
    md = (tmp_path / "bench" / "RESULTS.md").read_text()
    assert f"### {stem}: sd15-arch, fp16" in md and gpu_check.HOW_TO[2] in md

    with pytest.raises(UserError, match="unpacked already"):  # nothing is overwritten
        gpu_check.unpack(archive, results)
    assert sorted(p.name for p in results.iterdir()) == sorted([dest.name, f"{stem}.json", f"{stem}.csv"])


def test_unpack_refuses_what_it_cannot_place_and_moves_nothing(tmp_path, capsys):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "20261210-100000-cuda-nvidia-h200.csv").write_text("another run\n")
    with pytest.raises(UserError, match="different files named 20261210-100000-cuda-nvidia-h200.csv"):
        gpu_check.unpack(_archive(tmp_path / "a"), results)
    with pytest.raises(UserError, match="records no commit") as exc:
        gpu_check.unpack(_archive(tmp_path / "b", commit=None), results)
    assert "--commit" in str(exc.value)
    odd = _archive(tmp_path / "c")  # its date and card would name a folder: the date must be the script's
    work = tmp_path / "c" / "work"
    (work / gpu_check.PROVENANCE).write_text(json.dumps({"card": "x", "date": "../../elsewhere", "commit": "0123abc"}))
    gpu_check.pack(work, odd.parent)
    with pytest.raises(UserError, match="holds no readable provenance.json"):
        gpu_check.unpack(odd, results)
    assert [p.name for p in results.iterdir()] == ["20261210-100000-cuda-nvidia-h200.csv"]

    (tmp_path / "not.tgz").write_text("plain text")
    assert gpu_check.main(["unpack", str(tmp_path / "not.tgz"), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and "Traceback" not in err


def _script_steps(text: str) -> list[tuple[str, int, list[str]]]:
    """(name, limit, command) of each `step` line of a part of the script, continuation lines joined."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        m = re.search(r"(?:^|&& )step (\S+) (\d+) (.*)$", line.strip())
        if m and not line.lstrip().startswith("#"):
            found.append((m.group(1).strip('"'), int(m.group(2)), shlex.split(m.group(3))))
    return found


def _full_run_steps() -> list[tuple[str, int, list[str]]]:
    """The steps of a plain `bash bench/gpu-check.sh`: all but the --lossy branch's, the render loop's twice."""
    text = SCRIPT.read_text()
    start = text.index('if [ "$MODE" = lossy ]; then')
    end = text.index("\nfi\n", start)
    steps = _script_steps(text[:start] + text[end:])
    return [s for s in steps for _ in range(2 if "$i" in s[0] else 1)]


def test_the_full_run_fits_one_device_call():
    """The steps' limits add up to what the header says, inside the device's 600 s call (the packing after each
    step needs a few seconds of the rest), and the DiT rows run before the compile peer that may run out of time."""
    steps = _full_run_steps()
    total = sum(limit for _, limit, _ in steps)
    header = re.search(r"\((\d+) s in all at most", SCRIPT.read_text())
    assert header and int(header.group(1)) == total and total <= 600 - 15, total
    assert f"up to {total} s" in (REPO / "docs" / "gpu.md").read_text()
    names = [name for name, _, _ in steps]
    assert names.index("bench-flux") < names.index("peer-compile") and "bench-klein" in names


TINY_TWIN = {"flux-arch": "tiny-flux", "klein-arch": "tiny-klein"}


@pytest.mark.parametrize("name,model,steps", [("bench-flux", "flux-arch", 28), ("bench-klein", "klein-arch", 4)])
def test_dit_steps_run_on_the_cpu_at_a_tiny_size(name, model, steps, tmp_path):
    """The script's DiT steps as bench.gpu parses them: on the real architecture (built on the meta device: no
    weights allocated) they resolve to 1024², bf16, batch 1 at the model's own steps; the same settings with the tiny
    twin of the model, on the CPU at 64x64 and 2 steps, give a transformer row with it/s and MFU. The CPU run is in
    fp32: CPUs without bf16 matmul kernels take minutes for the run's bf16 ceiling GEMM alone."""
    import dataclasses

    import torch

    from movielm_fast.bench import gpu
    from movielm_fast.bench.models import dit_arch_bundle
    from movielm_fast.bench.runner import run_bench

    [(_, _, command)] = [s for s in _full_run_steps() if s[0] == name]
    assert command[:3] == ["$PY", "-m", "movielm_fast.bench.gpu"]
    args = gpu.parser().parse_args([str(tmp_path) if a == "$RES" else a for a in command[3:]])
    assert args.model == [model] and args.no_fp32_reference
    settings = gpu.settings_for(args, model)
    real = dit_arch_bundle(model, torch.device("meta"), torch.bfloat16)
    resolved = settings.resolved(torch.device("cuda"), real)
    assert (resolved.sizes, resolved.steps, resolved.batch_sizes, resolved.dtype, resolved.backends) == \
        ([(1024, 1024)], steps, [1], "bf16", ["torch"])
    assert resolved.peer_compile is None and resolved.scheduler == "default"

    tiny = dataclasses.replace(settings, model=TINY_TWIN[model], device="cpu", dtype="fp32", sizes=[(64, 64)],
                               steps=2)
    result = run_bench(tiny, log=lambda _: None).result
    assert result["settings"]["denoiser"] == "transformer" and result["settings"]["steps"] == 2
    [ours] = [r for r in result["runs"] if r["backend"] == "torch"]
    assert ours["status"] == "ok" and ours["transformer_steps_per_s"] > 0 and ours["mfu"]["transformer_step"] > 0
    assert any(r["backend"] == "diffusers" and r["status"] == "ok" for r in result["runs"])
