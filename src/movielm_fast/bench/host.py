"""Host-side throughput: the real engine on the zero-cost `null` backend, so only the engine's own work is left.

    python -m movielm_fast.bench.host [--frames 64] [--sizes 256,512] [--formats png,jpg] [--steps 20] [--batch 8]
                                      [--repeats 3]
    movielm-fast bench --host ...

For each size x format, and for the write stage pipelined (writer threads, the default) and sequential (threads=0,
every file written on the render thread, as before the write stage existed), one movie of `--frames` frames with
distinct prompts is rendered from scratch after a warm-up run, `--repeats` times alternating between the two.
Reported per case, from the run with the median frames/s (every repeat's figures beside it):

- render-thread host ms per frame: the render loop's time minus its waits for a free writer slot, per frame --
  what a GPU would have to wait for between batches;
- frames/s end to end: frames over the whole `render` call (planning, the write drain and the storyboard included);
- the split in ms per frame: prompt, latents, scheduler, unet (~0 here), decode on the render thread; pixels (the
  uint8 conversion, engine.frames), encode, hash, write, manifest, storyboard in the write stage (summed over
  threads);
- whether the pipelined files equal the sequential ones (same bytes for frames and storyboard; manifests equal
  except their timing field).

With `--movies N` it measures movie boundaries instead (issue 26: a GPU that dips where one movie ends and the next
begins): N movies of `--frames` frames each, pipelined writer, and per batch the render thread's time inside the
batch (prompt, latents, scheduler, decode) and its gap before the next one (the driver loop: handing the batch to
the writer, waiting for a free slot, progress). Gaps right after a batch that completes a movie (its manifest and
storyboard are due then) are reported apart from the others, with the excess per boundary over the other gaps.

Results go to bench/results/host-<stamp>.json; `python -m movielm_fast.bench.report` puts them in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.plan import RenderSettings
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import load_average, machine_info, source_state
from .models import resolve_model

HOST_FORMAT = "movielm-bench-host/1"
BOUNDARY_FORMAT = "movielm-bench-host-boundaries/1"

RENDER_STAGES = ("prompt", "latents", "scheduler", "unet", "decode")
WRITE_STAGES = ("pixels", "encode", "hash", "write", "manifest", "storyboard")


def _plan(path: Path, frames: int) -> Path:
    movie = {"id": "host", "title": "Host", "style": {"name": "Gothic", "description": "soft sepia, dimly lit rooms"},
             "characters": [{"name": "Rosa", "appearance": "a young woman with auburn hair in lavender"}],
             "frames": [{"id": f"{i:04d}", "description": f"Rosa crosses the ((ballroom)) in scene {i}, candles "
                                                          f"flicker", "dialogue": f"Line {i} of the story."}
                        for i in range(frames)]}
    path.write_text(json.dumps({"version": 1, "movies": [movie]}))
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _same_output(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        if name.endswith("manifest.json"):
            ma, mb = json.loads(a[name]), json.loads(b[name])
            for m in (ma, mb):
                for f in m["frames"]:
                    f.pop("seconds")
            if ma != mb:
                return False
        elif a[name] != b[name]:
            return False
    return True


def _median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median end-to-end rate, with every repeat's two figures beside it (this machine's timings
    spread by +-15% from run to run)."""
    r = dict(sorted(rs, key=lambda x: x["frames_per_s"])[len(rs) // 2])
    r["repeats"] = [[x["render_thread_ms_per_frame"], x["frames_per_s"]] for x in rs]
    return r


def run_case(renderer: Renderer, plan: Path, out: Path, size: int, fmt: str, steps: int, batch: int,
             threads: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    renderer.encoder.clear_cache()  # each run encodes its prompts, as a fresh process would
    renderer.times.clear()
    config = RunConfig(out=out, batch_size=batch, image_format=fmt, writer_threads=threads, style_training=False,
                       overrides=RenderSettings(width=size, height=size, steps=steps))
    t0 = time.perf_counter()
    s = render(config, [plan], executor=LocalExecutor(renderer=renderer))
    wall = time.perf_counter() - t0
    n = s.frames_rendered
    busy = s.render_seconds - s.write["waited_seconds"]
    return {"size": f"{size}x{size}", "format": fmt, "writer_threads": threads, "frames": n,
            "render_thread_ms_per_frame": round(1000 * busy / n, 2), "frames_per_s": round(n / wall, 2),
            "wall_seconds": round(wall, 3), "waited_ms_per_frame": round(1000 * s.write["waited_seconds"] / n, 2),
            "split_ms_per_frame": {**{k: round(1000 * renderer.times.get(k, 0.0) / n, 2) for k in RENDER_STAGES},
                                   **{k: round(1000 * s.write[f"{k}_seconds"] / n, 2) for k in WRITE_STAGES}}}


class _TimedExecutor(LocalExecutor):
    """LocalExecutor that notes when each batch's render-thread work starts and ends (wall clock, and the render
    thread's own CPU time, which leaves out its waits for a writer slot and other processes' turns), and its frames."""

    def __init__(self, renderer: Renderer):
        super().__init__(renderer=renderer)
        self.batches: list[tuple[tuple[float, float], tuple[float, float], list[str]]] = []

    def next_result(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        batch, result = super().next_result()
        movies = [t.job.movie_id for t in batch.tasks]
        self.batches.append(((t0, time.perf_counter()), (c0, time.thread_time()), movies))
        return batch, result


def _movies_plan(path: Path, movies: int, frames: int) -> Path:
    data = json.loads(_plan(path, frames).read_text())
    one = data["movies"][0]
    data["movies"] = [{**one, "id": f"m{m:02d}", "title": f"M{m}",
                       "frames": [{**f, "description": f"{f['description']} of movie {m}"} for f in one["frames"]]}
                      for m in range(movies)]
    path.write_text(json.dumps(data))
    return path


def boundary_case(renderer: Renderer, plan: Path, out: Path, size: int, fmt: str, steps: int, batch: int,
                  threads: int) -> dict[str, Any]:
    """One multi-movie run: the render thread's gaps between batches, at movie boundaries and elsewhere."""
    shutil.rmtree(out, ignore_errors=True)
    renderer.encoder.clear_cache()
    config = RunConfig(out=out, batch_size=batch, image_format=fmt, writer_threads=threads, style_training=False,
                       overrides=RenderSettings(width=size, height=size, steps=steps))
    executor = _TimedExecutor(renderer)
    t0 = time.perf_counter()
    s = render(config, [plan], executor=executor)
    wall = time.perf_counter() - t0
    left: dict[str, int] = {}
    for *_, movies in executor.batches:
        for movie_id in movies:
            left[movie_id] = left.get(movie_id, 0) + 1
    gaps: dict[tuple[str, bool], list[float]] = {(k, b): [] for k in ("wall", "cpu") for b in (True, False)}
    inside = []
    for (wall_ab, cpu_ab, movies), (wall_next, cpu_next, _) in zip(executor.batches, executor.batches[1:]):
        ends_movie = False
        for movie_id in movies:
            left[movie_id] -= 1
            ends_movie |= left[movie_id] == 0
        gaps["wall", ends_movie].append(1000 * (wall_next[0] - wall_ab[1]))
        gaps["cpu", ends_movie].append(1000 * (cpu_next[0] - cpu_ab[1]))
        inside.append(1000 * (cpu_ab[1] - cpu_ab[0]))
    mean = (lambda xs: round(sum(xs) / len(xs), 2) if xs else None)
    out = {"size": f"{size}x{size}", "format": fmt, "frames": s.frames_rendered, "batches": len(executor.batches),
           "boundaries": len(gaps["cpu", True]), "frames_per_s": round(s.frames_rendered / wall, 2),
           "batch_cpu_ms": mean(inside), "waited_seconds": s.write["waited_seconds"]}
    for kind in ("cpu", "wall"):
        at, other = gaps[kind, True], gaps[kind, False]
        out.update({f"gap_{kind}_ms_at_boundary": mean(at), f"gap_{kind}_ms_elsewhere": mean(other),
                    f"excess_{kind}_ms_per_boundary": round(mean(at) - mean(other), 2) if at and other else None,
                    f"max_gap_{kind}_ms_at_boundary": round(max(at), 2) if at else None})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("host", __doc__, model="tiny-sd", steps=20, frames=64, repeats=3, results="--results",
                      helps={"model": "tiny-sd (default), demo, sd15-arch, or a model folder",
                             "repeats": "runs per case, interleaved; the median run is reported"})
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--formats", default="png,jpg")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=RunConfig.model_fields["writer_threads"].default, help="writer threads (pipelined)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads of the render thread")
    ap.add_argument("--movies", type=int, help="measure movie boundaries: this many movies of --frames frames each")
    args = ap.parse_args(argv)

    # The render thread is one thread: on a GPU box the scheduler's tensors live on the GPU and torch's CPU thread
    # pool idles. Here they live on the CPU, and a 2-thread pool for tiny elementwise ops would fight the writer
    # threads for the two cores (scheduler steps ran several times slower under load when it did).
    torch.set_num_threads(args.torch_threads)
    # The tiny SD model: 1/8 latents as in every real SD model, so the scheduler's host work is what a real run's
    # is (the toy demo model's 1/4 latents would quadruple it).
    renderer = Renderer(ModelConfig(model=resolve_model(args.model), backend="null"))
    work = Path(tempfile.mkdtemp(prefix="movielm-host-"))
    load_start = load_average()
    runs = []
    try:
        if args.movies:
            return _boundaries(args, renderer, work, load_start)
        plan = _plan(work / "plan.json", args.frames)
        warm = _plan(work / "warm.json", args.batch)
        for size in map(int, args.sizes.split(",")):
            for fmt in args.formats.split(","):
                run_case(renderer, warm, work / "warm", size, fmt, args.steps, args.batch, args.threads)
                trials: dict[int, list[dict[str, Any]]] = {0: [], args.threads: []}
                reference, same = None, True
                for _ in range(args.repeats):
                    for threads in trials:  # side by side: sequential, then pipelined
                        r = run_case(renderer, plan, work / f"t{threads}", size, fmt, args.steps, args.batch, threads)
                        files = _files(work / f"t{threads}")
                        reference = reference or files  # the first sequential run's
                        same = same and _same_output(reference, files)
                        trials[threads].append(r)
                for threads, rs in trials.items():
                    r = _median_run(rs)
                    r["same_files_as_sequential"] = same
                    runs.append(r)
                    print(f"{r['size']:>8} {fmt:>4} threads={threads}: render thread "
                          f"{r['render_thread_ms_per_frame']:6.1f} ms/frame, {r['frames_per_s']:6.1f} frames/s end "
                          f"to end, same files: {same}  split {r['split_ms_per_frame']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"format": HOST_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(torch.device("cpu")),
              "settings": {"frames": args.frames, "steps": args.steps, "batch": args.batch, "model": args.model,
                           "backend": "null", "scheduler": "dpmpp", "torch_threads": args.torch_threads,
                           "writer_threads": args.threads, "repeats": args.repeats},
              "load_average": {"start": load_start, "end": load_average()}, "source": source_state(Renderer),
              "runs": runs}
    save_result(args.results, "host", result)
    return 0


def _boundaries(args, renderer: Renderer, work: Path, load_start) -> int:
    plan = _movies_plan(work / "movies.json", args.movies, args.frames)
    runs = []
    for size in map(int, args.sizes.split(",")):
        for fmt in args.formats.split(","):
            boundary_case(renderer, _plan(work / "warm.json", args.batch), work / "warm", size, fmt, args.steps,
                          args.batch, args.threads)
            rs = [boundary_case(renderer, plan, work / "b", size, fmt, args.steps, args.batch, args.threads)
                  for _ in range(args.repeats)]
            r = dict(sorted(rs, key=lambda x: x["frames_per_s"])[len(rs) // 2])
            r["repeats"] = [[x["gap_cpu_ms_at_boundary"], x["gap_cpu_ms_elsewhere"], x["gap_wall_ms_at_boundary"],
                             x["gap_wall_ms_elsewhere"], x["frames_per_s"]] for x in rs]
            runs.append(r)
            print(f"{r['size']:>8} {fmt:>4}: batch {r['batch_cpu_ms']} ms render-thread CPU; gap before the next "
                  f"batch, render-thread CPU {r['gap_cpu_ms_at_boundary']} ms after a movie ends vs "
                  f"{r['gap_cpu_ms_elsewhere']} ms elsewhere (excess {r['excess_cpu_ms_per_boundary']}), wall "
                  f"{r['gap_wall_ms_at_boundary']} vs {r['gap_wall_ms_elsewhere']} ms; {r['frames_per_s']} frames/s; "
                  f"repeats (cpu at/else, wall at/else, frames/s) {r['repeats']}", flush=True)
    result = {"format": BOUNDARY_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(torch.device("cpu")),
              "settings": {"movies": args.movies, "frames_per_movie": args.frames, "steps": args.steps,
                           "batch": args.batch, "model": args.model, "backend": "null",
                           "torch_threads": args.torch_threads, "writer_threads": args.threads,
                           "repeats": args.repeats},
              "load_average": {"start": load_start, "end": load_average()}, "source": source_state(Renderer),
              "runs": runs}
    save_result(args.results, "host", result)
    return 0


def host_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## Host-side throughput (`python -m movielm_fast.bench.host`)", "",
             f"The real engine on the zero-cost `null` backend: {st['frames']} frames per case"
             f"{', the median of %d interleaved runs' % st['repeats'] if st.get('repeats', 1) > 1 else ''}, "
             f"{st['steps']} "
             f"{st['scheduler']} steps, batch {st['batch']}, torch threads {st.get('torch_threads')}; "
             f"{m['cpu_model']}, "
             f"{m['cpu_cores_logical']} logical cores; {load_note(res)}; {res['created']}. *render thread*: the render "
             "loop's time minus its waits for a free writer slot, per frame (what a GPU would wait for); *end to "
             "end*: frames over the whole run (planning, the write drain and the storyboard included). Sequential = "
             "every file written on the render thread (writer threads 0), pipelined = the write stage on its "
             "threads; *same files*: frames and storyboard byte-identical, manifests equal but for timings.", "",
             "| size | format | writer threads | render thread ms/frame | end to end frames/s | same files | "
             "split ms/frame (prompt, latents, scheduler, decode · pixels, encode, hash, write, manifest, "
             "storyboard) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sp = r["split_ms_per_frame"]
        split = ", ".join(f"{sp[k]:g}" for k in ("prompt", "latents", "scheduler", "decode")) + " · " + \
            ", ".join(f"{sp[k]:g}" if k in sp else "–" for k in (
                "pixels", "encode", "hash", "write", "manifest", "storyboard"))
        lines.append(f"| {r['size']} | {r['format']} | {r['writer_threads']} | {r['render_thread_ms_per_frame']:.1f} "
                     f"| {r['frames_per_s']:.1f} | {'yes' if r['same_files_as_sequential'] else 'NO'} | {split} |")
    return lines + [""]


def boundary_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## Movie boundaries on the render thread (`python -m movielm_fast.bench.host --movies N`)", "",
             f"{st['movies']} movies of {st['frames_per_movie']} frames, batch {st['batch']}, {st['steps']} steps, "
             f"null backend, {st['writer_threads']} writer threads, the median of {st['repeats']} runs; "
             f"{m['cpu_model']}, {m['cpu_cores_logical']} logical cores; {load_note(res)}; {res['created']}. "
             "*gap*: the "
             "render thread's time between one batch and the next (a GPU's idle time there), after a batch that "
             "completes a movie vs after the others: its own CPU time (work on the render thread) and wall time "
             "(with its waits for a free writer slot, which on 2 cores dominate).", "",
             "| size | format | batch CPU ms | gap CPU ms at a boundary / elsewhere | excess CPU ms per boundary | "
             "gap wall ms at a boundary / elsewhere | frames/s |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['size']} | {r['format']} | {r['batch_cpu_ms']} | {r['gap_cpu_ms_at_boundary']} / "
                     f"{r['gap_cpu_ms_elsewhere']} | {r['excess_cpu_ms_per_boundary']} | "
                     f"{r['gap_wall_ms_at_boundary']} / {r['gap_wall_ms_elsewhere']} | {r['frames_per_s']} |")
    return lines + [""]


SECTIONS = (Section(HOST_FORMAT, host_section), Section(BOUNDARY_FORMAT, boundary_section))


if __name__ == "__main__":
    raise SystemExit(main())
