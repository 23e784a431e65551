"""Scaling of `render_on_ray`: images/s with 1, 2, ... workers, per-worker model-load time, scheduling overhead.

    python -m movielm_fast.bench.cluster_scaling [--workers 1,2] [--model demo] [--size 64,256] [--steps 2]
                                                 [--movies 8 --frames 4] [--reps 3] [--device cpu|cuda]
                                                 [--out bench/results]

A private Ray instance bound to 127.0.0.1 is started here. On CPU each worker gets one core and one torch thread
(`cpus_per_worker=1`), so N workers need N free cores; on CUDA one worker per GPU. For every (size, workers) case:
start a pool (timed: process start, imports, model load -- reported per worker), render a warm-up job (one
batch per worker, so every engine is warm), then render the job `--reps` times into fresh folders and report the
median. The local runner with one thread renders the same job once as the single-process reference.

Reported per case:
- images/s overall: frames / wall time of the render phase (driver's view, files written included);
- images/s per worker: its frames / the seconds it spent inside `render_batch`;
- idle s/frame: (workers x wall - total rendering seconds) / frames -- what scheduling, object-store transfers,
  the driver's PNG writing the workers waited for, and the tail cost per frame. With one worker this is the
  scheduling overhead per frame against rendering in-process.
Results: bench/results/cluster-<timestamp>.json, with one rendered storyboard beside it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.run.cluster import RayExecutor
from movielm_fast.run.config import ClusterOptions, RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor

from .args import bench_parser


def _plans(folder: Path, movies: int, frames: int, size: int, steps: int, prefix: str = "m") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"version": 1, "defaults": {"width": size, "height": size, "steps": steps, "guidance": 7.5, "seed": 1},
            "movies": [{"id": f"{prefix}{i:03d}", "style": {"name": "Gothic", "description": "soft sepia"},
                        "characters": [{"name": "Rosa", "appearance": "a woman in lavender"}],
                        "frames": [{"id": f"{j:03d}", "description": f"Rosa in scene {j} of movie {i}",
                                    "dialogue": f"line {j}"} for j in range(frames)]} for i in range(movies)]}
    (folder / "plan.json").write_text(json.dumps(data))
    return folder


def _local_reference(model: ModelConfig, config: RunConfig, plans: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one worker gets
    try:
        executor = LocalExecutor(model)
        render(config, [plans], executor=executor)  # warm-up
        shutil.rmtree(config.out)
        s = render(config, [plans], executor=executor)
    finally:
        torch.set_num_threads(threads)
    return {"images_per_second": round(s.images_per_second, 3), "frames": s.frames_rendered,
            "seconds_per_frame": round(s.render_seconds / max(1, s.frames_rendered), 4)}


def _case(model: ModelConfig, config: RunConfig, workers: int, plans: Path, warm: Path, reps: int,
          scratch: Path) -> dict:
    cpu = not model.device.startswith("cuda")
    opts = ClusterOptions(cluster="ray", address="local", workers=workers, cpus_per_worker=1 if cpu else None)
    with RayExecutor(model, opts) as executor:
        startup = executor.startup_seconds
        loads = [s["load_seconds"][0] for s in executor.worker_stats()]
        warm_config = config.changed(out=scratch / "warm")
        render(warm_config, [warm], executor=executor)
        runs = []
        for r in range(reps):
            run_config = config.changed(out=scratch / f"w{workers}-r{r}")
            runs.append(render(run_config, [plans], executor=executor).as_dict())
    best = sorted(runs, key=lambda d: d["images_per_second"])[len(runs) // 2]  # the median run
    return {"workers": workers, "startup_seconds": round(startup, 3), "model_load_seconds": loads,
            "images_per_second": best["images_per_second"],
            "images_per_second_runs": [d["images_per_second"] for d in runs],
            "per_worker_images_per_second": [w["images_per_second"] for w in best["workers"]],
            "per_worker_frames": [w["frames"] for w in best["workers"]],
            "idle_seconds_per_frame": best["idle_seconds_per_frame"],
            "idle_seconds_per_frame_runs": [d["idle_seconds_per_frame"] for d in runs],
            "frames": best["rendered"], "batch_size": best["batch_size"], "storyboard": best["storyboards"][0]}


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser("cluster_scaling", __doc__, model="demo", device=True, steps=2, frames=4, results="--out")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--size", default="64,256", help="image sizes to run, comma-separated")
    ap.add_argument("--movies", type=int, default=8)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    # A private Ray instance for the benchmark, reachable from this machine only (read when Ray is imported).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray  # optional dependency (the cluster extra)

    logging.getLogger("movielm_fast").setLevel(logging.WARNING)
    workers = [int(w) for w in args.workers.split(",")]
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING,
             num_cpus=max(workers) if not args.device.startswith("cuda") else None)
    scratch = Path(tempfile.mkdtemp(prefix="movielm-cluster-bench-"))
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    cases = []
    try:
        for size in (int(s) for s in args.size.split(",")):
            plans = _plans(scratch / f"plans-{size}", args.movies, args.frames, size, args.steps)
            warm = _plans(scratch / f"warm-{size}", max(workers), 4, size, args.steps, prefix="warm")
            model = ModelConfig(model=args.model, device=args.device)
            config = RunConfig(batch_size=batch, out=scratch / "unused", style_training=False)
            local = None
            if not args.device.startswith("cuda"):
                local = _local_reference(ModelConfig(model=args.model), config.changed(out=scratch / f"local-{size}"),
                                         plans)
            for n in workers:
                case = {"size": size, "steps": args.steps, **_case(model, config, n, plans, warm, args.reps, scratch)}
                case["local_1_thread"] = local
                cases.append(case)
                print(json.dumps({k: v for k, v in case.items() if k != "storyboard"}), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        image = args.out / f"cluster-{stamp}-storyboard.png"
        shutil.copy(cases[-1]["storyboard"], image)
        result = {"bench": "cluster_scaling", "when": stamp, "model": args.model, "device": args.device,
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "load_average_1m": os.getloadavg()[0], "ray": ray.__version__},
                  "job": {"movies": args.movies, "frames_per_movie": args.frames, "steps": args.steps,
                          "reps": args.reps},
                  "cases": [{k: v for k, v in c.items() if k != "storyboard"} for c in cases],
                  "image": image.name}
        path = args.out / f"cluster-{stamp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {path}")
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
