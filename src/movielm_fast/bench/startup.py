"""Time to first frame: `movielm-fast render` as a user runs it, from process start to the first frame file.

    python -m movielm_fast.bench.startup [--plan examples/plan.json] [--model demo] [--device cpu] [--repeats 3]
                                         [--results bench/results] [-- extra render flags]

Each repeat starts a fresh `python -m movielm_fast.cli.main render PLAN --json --quiet --no-style-training` into an
empty folder (the model itself stays in the cache and the page cache: the first, untimed run puts it there), polls
that folder every 5 ms for the first frame file, and records:

- first_frame_seconds: process start -> the first frame file on disk, seen from outside (the goal's figure);
- total_seconds: process start -> exit;
- the run's own start-up report (`render --json` "startup": seconds per phase, run/startup.py), which also
  splits `imports` (interpreter, torch, diffusers) from everything after.

One more run under `python -X importtime` splits the imports by top-level package (each module's own time, summed:
`import_seconds_by_package`; importtime's bookkeeping makes that run a little slower). It shows the floor: torch,
and diffusers with what it imports by itself (torch._dynamo with sympy/mpmath/triton through
diffusers.utils.torch_utils; transformers; peft whenever it is installed, as in the dev extra).

Best (the goal is stated as best of 3) and median over the repeats; results go to bench/results/startup-<stamp>.json
(relative to the working folder). Extra arguments after `--` go to `render` (e.g. `-- --batch-size 4` to compare
with the first-frame-alone ramp off). No test asserts these timings.
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

from .args import bench_parser
from .formats import Section
from .hardware import load_average

STARTUP_FORMAT = "movielm-fast-startup-v1"

FRAME_SUFFIXES = (".png", ".jpg", ".webp")


def first_frame(out: Path) -> bool:
    """Whether a frame file has been renamed into place (temporary files start with a dot)."""
    return any(p.suffix in FRAME_SUFFIXES and not p.name.startswith(".") for p in out.glob("*/frames/*"))


def run_once(plan: Path, extra: list[str], poll: float = 0.005) -> dict[str, Any]:
    """One fresh `render` process: its first-frame and total wall times, and its own start-up report."""
    with tempfile.TemporaryDirectory(prefix="mlf-startup-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "movielm_fast.cli.main", "render", str(plan), "--out", str(out), "--json",
               "--quiet", "--no-style-training", *extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        first = None
        while proc.poll() is None:
            if first is None and first_frame(out):
                first = time.perf_counter() - t0
            time.sleep(poll)
        total = time.perf_counter() - t0
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"render failed ({proc.returncode}): {stderr.strip()[-2000:]}")
        summary = json.loads(stdout.strip().splitlines()[-1])
        return {"first_frame_seconds": round(first if first is not None else total, 3),
                "total_seconds": round(total, 3), "startup": summary.get("startup"),
                "frames": summary["rendered"], "batch_size": summary["batch_size"]}


def import_breakdown(plan: Path, extra: list[str], top: int = 12) -> dict[str, float]:
    """Seconds of import per top-level package (self times summed) in one `render` under -X importtime; the rest
    summed as "other"."""
    with tempfile.TemporaryDirectory(prefix="mlf-startup-") as tmp:
        cmd = [sys.executable, "-X", "importtime", "-m", "movielm_fast.cli.main", "render", str(plan), "--out",
               str(Path(tmp) / "out"), "--json", "--quiet", "--no-style-training", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|")
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(own) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    out = {k: round(v, 3) for k, v in ranked[:top]}
    out["other"] = round(sum(v for _, v in ranked[top:]), 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = bench_parser("startup", __doc__, model="demo", device=True, repeats=3, results="--results")
    ap.add_argument("--plan", type=Path, default=Path("examples/plan.json"))
    args = ap.parse_args(argv)
    extra = ["--model", args.model, "--device", args.device, *extra]
    run_once(args.plan, extra)  # untimed: the demo model assembled in the cache, files in the page cache
    runs = [run_once(args.plan, extra) for _ in range(args.repeats)]
    imports = import_breakdown(args.plan, extra)
    firsts = [r["first_frame_seconds"] for r in runs]
    result = {"format": STARTUP_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "plan": str(args.plan),
              "model": args.model, "device": args.device,
              "render_args": extra, "load_avg": load_average(), "cpu_count": os.cpu_count(),
              "first_frame_seconds": {"best": min(firsts), "median": statistics.median(firsts)},
              "total_seconds": {"best": min(r["total_seconds"] for r in runs),
                                "median": statistics.median(r["total_seconds"] for r in runs)},
              "import_seconds_by_package": imports, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    best = min(runs, key=lambda r: r["first_frame_seconds"])
    print(f"first frame: best {min(firsts):.2f} s, median {statistics.median(firsts):.2f} s over {len(runs)} runs "
          f"(load average {result['load_avg']}); phases of the best run: {best['startup']}")
    print(f"imports by package (one -X importtime run): {imports}")
    print(f"results: {path}")
    return result


def startup_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    best = min(res["runs"], key=lambda r: r["first_frame_seconds"])
    phases = (best.get("startup") or {}).get("phases", {})
    ff, tot = res["first_frame_seconds"], res["total_seconds"]
    lines = ["## Time to first frame (`python -m movielm_fast.bench.startup`)", "",
             f"`movielm-fast render {res['plan']} {' '.join(res['render_args'])}` as a fresh process, "
             f"{len(res['runs'])} timed runs after an untimed one; {res['cpu_count']} CPUs, load average "
             f"{res['load_avg'][0]:.2f} at the start; {res['created']}. Process start to the first frame file on "
             f"disk: **best {ff['best']:.2f} s**, median {ff['median']:.2f} s; whole run best {tot['best']:.2f} s.",
             "", "Phases of the best run (seconds, as the run's own `--json` reports them):", "",
             "| " + " | ".join(phases) + " |", "|" + "---|" * len(phases),
             "| " + " | ".join(f"{v:.2f}" for v in phases.values()) + " |"]
    return lines + [""]


SECTIONS = (Section(STARTUP_FORMAT, startup_section),)


if __name__ == "__main__":
    main()
