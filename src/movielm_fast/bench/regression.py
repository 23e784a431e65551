"""A real CPU render, this code against an earlier revision, side by side in one run.

    python -m movielm_fast.bench.regression [--base 88a8603] [--model sd15-arch] [--size 256] [--steps 4] [--frames 3]
                               [--rounds 2]

The host-side work of issue 15 (write stage, uint8 on the device, token-id cache) must not slow down a render whose
time is all UNet and VAE. The base revision is checked out into a temporary git worktree; each round renders the
same plan (batch 1, no style training) once with the base and once with this tree, in alternating order, each in a
fresh process. Per run: wall seconds of the process and the render's own seconds per frame (its JSON summary's
`seconds` over `rendered`), the median over rounds per side, and their ratio. Results go to
bench/results/regression-<stamp>.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import ROOT, load_average, machine_info
from .models import resolve_model

REGRESSION_FORMAT = "movielm-bench-regression/1"


def _plan(path: Path, frames: int, size: int, steps: int) -> Path:
    movie = {"id": "reg", "title": "Regression", "style": {"name": "Gothic", "description": "soft sepia"},
             "characters": [{"name": "Rosa", "appearance": "a young woman with auburn hair"}],
             "frames": [{"id": f"{i:03d}", "description": f"Rosa in the hall, scene {i}"} for i in range(frames)],
             "render": {"width": size, "height": size, "steps": steps, "seed": 3}}
    path.write_text(json.dumps({"version": 1, "movies": [movie]}))
    return path


def _run(tree: Path, plan: Path, model: str, out: Path) -> dict[str, float]:
    # Revisions before the src layout kept the CLI in a top-level movielm_cli package.
    src = tree / "src"
    cli = "movielm_fast.cli.main" if (src / "movielm_fast").is_dir() else "movielm_cli.main"
    cmd = [sys.executable, "-c", f"from {cli} import cli; cli()", "render", str(plan), "--model", model,
           "--out", str(out), "--batch-size", "1", "--no-style-training", "--quiet", "--json", "--force"]
    env = {**os.environ, "PYTHONPATH": str(src if src.is_dir() else tree), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"render failed in {tree}:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    frames = summary["rendered"]  # the CLI's JSON summary, the same fields in both revisions
    return {"wall_seconds": round(wall, 2), "frames": frames,
            "render_seconds_per_frame": round(summary["seconds"] / frames, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("regression", __doc__, model="sd15-arch", size=256, steps=4, frames=3, results="--results")
    ap.add_argument("--base", default="88a8603", help="the revision to compare with (default: before issue 15)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    model = str(resolve_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="movielm-regression-"))
    base_tree = work / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                   check=True)
    load_start = load_average()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    try:
        plan = _plan(work / "plan.json", args.frames, args.size, args.steps)
        for r in range(args.rounds):
            order = ("base", "head") if r % 2 == 0 else ("head", "base")  # alternate, so drift hits both sides
            for side in order:
                tree = base_tree if side == "base" else ROOT
                res = _run(tree, plan, model, work / f"out-{side}")
                runs[side].append(res)
                print(f"round {r} {side}: {res}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    med = {side: statistics.median(x["render_seconds_per_frame"] for x in rs) for side, rs in runs.items()}
    result: dict[str, Any] = {
        "format": REGRESSION_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(torch.device("cpu")),
        "settings": {"base": args.base, "model": args.model, "size": args.size, "steps": args.steps,
                     "frames": args.frames, "rounds": args.rounds, "batch": 1},
        "load_average": {"start": load_start, "end": load_average()}, "runs": runs,
        "median_seconds_per_frame": med, "head_over_base": round(med["head"] / med["base"], 3)}
    print(f"median s/frame: base {med['base']:.3f}, head {med['head']:.3f} (head/base {result['head_over_base']})")
    save_result(args.results, "regression", result)
    return 0


def regression_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m, med = res["settings"], res["machine"], res["median_seconds_per_frame"]
    lines = ["## A real CPU render against an earlier revision (`python -m movielm_fast.bench.regression`)", "",
             f"{st['model']}, {st['size']}², {st['steps']} steps, batch 1, fp32 on {m['cpu_model']} "
             f"({m['cpu_cores_logical']} cores); revision {st['base']} and this tree in alternating order, each run a "
             f"fresh process rendering {st['frames']} frames; medians over {st['rounds']} rounds; {load_note(res)}; "
             f"{res['created']}.", "",
             "| code | render s/frame (median) | runs (s/frame) |", "|---|---|---|"]
    for side in ("base", "head"):
        runs = ", ".join(f"{r['render_seconds_per_frame']:.3f}" for r in res["runs"][side])
        lines.append(f"| {st['base'] if side == 'base' else 'this tree'} | {med[side]:.3f} | {runs} |")
    return lines + ["", f"This tree / base: **{res['head_over_base']:.3f}**.", ""]


SECTIONS = (Section(REGRESSION_FORMAT, regression_section),)


if __name__ == "__main__":
    raise SystemExit(main())
