"""CPU threads under load: renders timed while 0, 1 and 2 cores are kept busy by other processes.

    movielm-fast bench --threads-load [--out DIR]
    python -m movielm_fast.bench.threads [--busy 0,1,2] [--repeats 1] [--sd-frames 1] [--results DIR]

A shared machine is the usual case on a CPU: `make` runs an LLM server beside the renderer, an edge box runs other
services. For each load this benchmark starts one busy-loop process per busy core (a Python `while True: pass`,
stopped after that load's runs), then renders, each configuration in a fresh `movielm-fast render` process (OpenMP
reads its wait policy when torch loads, so it cannot change within a process):

    default       what a user gets: --threads auto, the wait policy the CLI sets (passive)
    spinning      the same without the CLI's wait policy: libgomp's own default, idle threads spin (before issue 33)
    one thread    --threads 1
    onnxruntime   --backend onnxruntime (intra-op threads from --threads auto; ONNX Runtime never spins here)

two plans: the demo plan (examples/plan.json, the demo model's own settings) and sd15-arch (the SD 1.5
architecture with random weights) at 256x256, 4 steps. The configurations run in a rotating order, so a drift in the
machine's other load does not always hit the same one. Each figure is the wall time of the whole process (imports,
model load, render, files), the time a user waits; the render's own seconds (its --json summary) are kept beside it.
Before the timed runs, one untimed run per plan and backend fills the caches (the demo model folder, sd15-arch's
weights, ONNX exports). The goal (issue 33): at every load the default within 1.2x of the fastest configuration
measured, and never slower than one thread. Results: <results>/threads-<stamp>.json.
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
from .formats import Section, save_result

THREADS_FORMAT = "movielm-bench-threads/1"
GOAL = 1.2  # the default within this factor of the fastest configuration at every load

LAUNCH = "from movielm_fast.cli.main import cli; cli()"
# The CLI without the step that sets the wait policy (LazyGroup.make_context): click's own, as before issue 33.
LAUNCH_WITHOUT_WAIT_POLICY = ("import sys, click\nfrom movielm_fast.cli.main import cli\n"
                              "with click.Group.make_context(cli, 'movielm-fast', sys.argv[1:]) as ctx:\n"
                              "    cli.invoke(ctx)")
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "default": (LAUNCH, []),
    "spinning": (LAUNCH_WITHOUT_WAIT_POLICY, []),
    "one thread": (LAUNCH, ["--threads", "1"]),
    "onnxruntime": (LAUNCH, ["--backend", "onnxruntime"]),
}


def sd15_plan(folder: Path, frames: int, size: int, steps: int) -> Path:
    movie = {"id": "threads", "title": "Threads", "style": {"name": "Gothic", "description": "soft sepia"},
             "characters": [{"name": "Rosa", "appearance": "a young woman with auburn hair"}],
             "frames": [{"id": f"{i:03d}", "description": f"Rosa in the hall, scene {i}"} for i in range(frames)],
             "render": {"width": size, "height": size, "steps": steps, "seed": 3}}
    path = folder / "sd15-plan.json"
    path.write_text(json.dumps({"version": 1, "movies": [movie]}))
    return path


class BusyCores:
    """`n` processes that each keep one core busy, for as long as the `with` block runs."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self) -> BusyCores:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(1.0 if self.n else 0.0)  # let the scheduler see them before the first run starts
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def run_render(launch: str, plan: Path, model: str, extra: list[str], timeout: float) -> dict[str, Any]:
    """One fresh render process into an empty folder: wall seconds, the render's own seconds, the load around it."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mlf-threads-") as tmp:
        cmd = [sys.executable, "-c", launch, "render", str(plan), "--model", model, "--out", str(Path(tmp) / "out"),
               "--json", "--no-style-training", *extra]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "wall_seconds": round(timeout, 1), "load_before": round(load_before, 2),
                    "load_after": round(os.getloadavg()[0], 2)}
        wall = time.perf_counter() - t0
    if proc.returncode:
        return {"status": "failed", "error": proc.stderr.strip()[-500:], "wall_seconds": round(wall, 2)}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", "wall_seconds": round(wall, 2), "render_seconds": summary["seconds"],
            "frames": summary["rendered"], "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> Path:
    ap = bench_parser("threads", __doc__, repeats=1, results="--results",
                      helps={"repeats": "timed runs of each configuration at each load"})
    ap.add_argument("--busy", default="0,1,2", help="busy cores, comma-separated")
    ap.add_argument("--plan", type=Path, default=Path("examples/plan.json"), help="the demo model's plan")
    ap.add_argument("--sd-frames", type=int, default=1, help="frames of the sd15-arch plan")
    ap.add_argument("--sd-size", type=int, default=256)
    ap.add_argument("--sd-steps", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take before it is stopped")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="configurations, comma-separated")
    ap.add_argument("--plans", default="demo,sd15-arch", help="plans, comma-separated")
    args = ap.parse_args(argv)
    import torch

    from .hardware import load_average, machine_info  # torch: after the arguments are checked
    from .models import resolve_model

    busy = [int(b) for b in args.busy.split(",")]
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}: use {', '.join(CONFIGS)}")
    if not args.plan.is_file():
        ap.error(f"{args.plan} not found: run from the repository root, or pass --plan")
    work = Path(tempfile.mkdtemp(prefix="mlf-threads-"))
    plans = {"demo": lambda: (args.plan.resolve(), "demo"),
             "sd15-arch": lambda: (sd15_plan(work, args.sd_frames, args.sd_size, args.sd_steps),
                                   str(resolve_model("sd15-arch")))}
    plans = {name: plans[name]() for name in args.plans.split(",")}
    result: dict[str, Any] = {
        "format": THREADS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(torch.device("cpu")),
        "settings": {"busy": busy, "configs": configs, "plans": list(plans), "repeats": args.repeats,
                     "demo_plan": str(args.plan),
                     "sd15": {"frames": args.sd_frames, "size": args.sd_size, "steps": args.sd_steps},
                     "goal": GOAL},
        "load_average": {"start": load_average()}, "warmup": {}, "runs": []}
    for name, (plan, model) in plans.items():  # untimed: caches filled, exports made
        for backend in sorted({"onnxruntime" if c == "onnxruntime" else "torch" for c in configs}):
            res = run_render(LAUNCH, plan, model, ["--backend", backend], args.timeout * 3)
            result["warmup"][f"{name} {backend}"] = res
            print(f"warm-up {name} {backend}: {res}", flush=True)
    k = 0
    for n in busy:
        with BusyCores(n):
            for _ in range(args.repeats):
                for name, (plan, model) in plans.items():
                    order = configs[k % len(configs):] + configs[:k % len(configs)]
                    k += 1
                    for config in order:
                        launch, extra = CONFIGS[config]
                        res = {"busy": n, "plan": name, "config": config,
                               **run_render(launch, plan, model, extra, args.timeout)}
                        result["runs"].append(res)
                        print(json.dumps(res), flush=True)
    result["load_average"]["end"] = load_average()
    return save_result(args.results, "threads", result)


def summary(res: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """(plan, busy cores) -> per configuration its median render and wall seconds (None: a run timed out or
    failed), and on the render seconds default / fastest, default / one thread."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for run in res["runs"]:
        cell = out.setdefault((run["plan"], run["busy"]), {"runs": {}, "load": []})
        cell["runs"].setdefault(run["config"], []).append(run)
        cell["load"] += [run[k] for k in ("load_before", "load_after") if k in run]
    for cell in out.values():
        for key in ("render", "wall"):
            cell[key] = {c: statistics.median([r[f"{key}_seconds"] for r in runs])
                         if all(r["status"] == "ok" for r in runs) else None for c, runs in cell["runs"].items()}
        done = [w for w in cell["render"].values() if w is not None]
        default, one = cell["render"].get("default"), cell["render"].get("one thread")
        cell["vs_best"] = default / min(done) if default and done else None
        cell["vs_one"] = default / one if default and one else None
    return out


def _not_done(runs: list[dict[str, Any]] | None) -> str:
    if not runs:
        return "–"
    bad = next(r for r in runs if r["status"] != "ok")
    return f"> {bad['wall_seconds']:.0f} (stopped)" if bad["status"] == "timeout" else "failed"


def threads_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    m = results[-1]["machine"]
    lines = ["## CPU threads under load (`movielm-fast bench --threads-load`, `bench/threads.py`)", "",
             f"{m['cpu_model']}, {m['cpu_cores_logical']} cores. Each cell: the seconds of a fresh `movielm-fast "
             "render` process's job as its `--json` summary reports them (plan checks, model load, render, files), "
             "and in brackets the process's wall seconds (imports too), the median of the run's repeats, while the "
             "given number of cores ran a busy loop each (started and stopped by the benchmark); the ratios compare "
             "the job's seconds. The machine was shared with other work the benchmark does not control: each row "
             "gives the 1-minute load average seen before and after its runs. *demo*: `examples/plan.json` (9 "
             "frames, 64x64, the demo model's 20 steps); *sd15-arch*: the SD 1.5 architecture with random weights. "
             "*default*: `--threads auto` with the CLI's passive wait policy; *spinning*: the same threads with "
             "libgomp's own wait policy (idle threads spin: the default before issue 33); *one thread*: "
             "`--threads 1`; *onnxruntime*: `--backend onnxruntime`.", ""]
    for res in results:
        lines += _run_table(res)
    return lines


def _run_table(res: dict[str, Any]) -> list[str]:
    st, la, sd = res["settings"], res["load_average"], res["settings"]["sd15"]
    configs = st["configs"]
    sd15 = f"sd15-arch {sd['frames']} frame(s) at {sd['size']}x{sd['size']}, {sd['steps']} steps; " \
        if "sd15-arch" in st.get("plans", ["sd15-arch"]) else ""
    lines = [f"### {res['created']}", "",
             f"{st['repeats']} run(s) per cell; {sd15}load average {la['start'][0]:.1f} at the start, "
             f"{la['end'][0]:.1f} at the end{_commit(res)}.",
             "", "| plan | busy cores | load avg | " + " | ".join(configs) + " | default / fastest | "
             "default / one thread |", "|" + "---|" * (len(configs) + 5)]
    cells = summary(res)
    for (plan, busy), cell in sorted(cells.items()):
        walls = [f"{cell['render'][c]:.1f} ({cell['wall'][c]:.0f})" if cell["render"].get(c) else
                 _not_done(cell["runs"].get(c)) for c in configs]
        load = f"{min(cell['load']):.1f}–{max(cell['load']):.1f}" if cell["load"] else "–"
        ratio = [f"{cell[k]:.2f}×" if cell[k] else "–" for k in ("vs_best", "vs_one")]
        lines.append(f"| {plan} | {busy} | {load} | " + " | ".join(walls) + f" | {ratio[0]} | {ratio[1]} |")
    ok = [c for c in cells.values() if c["vs_best"] is not None]
    worst = max((c["vs_best"] for c in ok), default=None)
    slower = [c["vs_one"] for c in ok if c["vs_one"] and c["vs_one"] > 1.0]
    if worst is not None:
        lines += ["", f"Goal: the default within {st['goal']}× of the fastest at every load: "
                  f"{'**met**' if worst <= st['goal'] else '**not met**'} (worst {worst:.2f}×); never slower than one "
                  f"thread: {'**met**' if not slower else f'**not met** (up to {max(slower):.2f}×)'}."]
    return lines + [""]


def _commit(res: dict[str, Any]) -> str:
    """The code measured (what `auto` chose changed between runs)."""
    git = res["machine"].get("git") or {}
    return f"; code at {git['commit'][:7]}{' (with local changes)' if git.get('dirty') else ''}" \
        if git.get("commit") else ""


SECTIONS = (Section(THREADS_FORMAT, threads_section),)


if __name__ == "__main__":
    main()
