"""Cost of consistent characters (anchor attention): time per frame with 1, 2, 3 characters vs plain, the anchor's
own cost, and the record's memory per character.

    python -m movielm_fast.bench.consistency [--model sd15-arch] [--size 256] [--steps 4] [--frames 2] [--repeats 2]

One renderer; for each case a movie of `--frames` frames (each naming 0 = plain, 1, 2 or 3 characters) is rendered
at batch 1 with the anchors' records already made (the anchor cost is measured on its own, once per character);
cases are interleaved over the repeats and the median taken. Results go to bench/results/consistency-<stamp>.json.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.plan import parse_plan
from movielm_fast.run.renderer import Renderer

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import load_average, machine_info
from .models import resolve_model

CONSISTENCY_FORMAT = "movielm-bench-consistency/1"

NAMES = ("Rosa", "Tom", "Ada")


def _movie(chars: int, frames: int, size: int, steps: int, mode: str) -> dict:
    return {"id": f"c{chars}", "style": {"name": "Gothic", "description": "soft sepia"},
            "characters": [{"name": n, "appearance": f"a person called {n} in a long coat"} for n in NAMES],
            "frames": [{"id": f"{i:03d}", "description": " and ".join(NAMES[:chars]) + f" in scene {i}" if chars
                        else f"an empty hall, scene {i}", "seed": 100 + i} for i in range(frames)],
            "render": {"width": size, "height": size, "steps": steps, "seed": 1}, "consistency": {"mode": mode}}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("consistency", __doc__, model="sd15-arch", size=256, steps=4, frames=2, repeats=2,
                      results="--results")
    args = ap.parse_args(argv)

    r = Renderer(ModelConfig(model=resolve_model(args.model)))
    load_start = load_average()
    cases = {"plain": (0, "none"), **{f"{k} character(s)": (k, "anchor_attention") for k in (1, 2, 3)}}
    tasks = {}
    for name, (chars, mode) in cases.items():
        lm = parse_plan(_movie(chars, args.frames, args.size, args.steps, mode))[0]
        tasks[name] = r.plan(lm, None, lm.settings.__class__()).tasks
    # Anchors once each, timed alone; their records are what every anchored frame reads.
    anchor_seconds, anchor_bytes = [], []
    for spec in {a.key: a for ts in tasks.values() for t in ts for a in t.job.anchors}.values():
        t0 = time.perf_counter()
        record = r._anchor(spec)
        anchor_seconds.append(time.perf_counter() - t0)
        anchor_bytes.append(record.nbytes)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every case alike
        for name, ts in tasks.items():
            for t in ts:
                t0 = time.perf_counter()
                r.render([t.job], t.settings)[0].numpy()  # the pixels too: on a GPU, render only queues the work
                times[name].append(time.perf_counter() - t0)
    plain = statistics.median(times["plain"])
    rows = [{"case": name, "characters": cases[name][0], "seconds_per_frame": round(statistics.median(v), 3),
             "vs_plain": round(statistics.median(v) / plain, 3), "samples": len(v)} for name, v in times.items()]
    result = {"format": CONSISTENCY_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(torch.device("cpu")),
              "settings": {"model": args.model, "size": args.size, "steps": args.steps, "frames": args.frames,
                           "repeats": args.repeats, "batch": 1, "scheduler": "dpmpp", "guidance": 7.5},
              "anchor_seconds": round(statistics.median(anchor_seconds), 3),
              "record_mb_per_character": round(statistics.median(anchor_bytes) / 2**20, 2),
              "load_average": {"start": load_start, "end": load_average()}, "runs": rows}
    for row in rows:
        print(f"{row['case']:>16}: {row['seconds_per_frame']:.3f} s/frame ({row['vs_plain']:.2f}x plain)")
    print(f"anchor: {result['anchor_seconds']:.3f} s each; record {result['record_mb_per_character']} MB/character")
    save_result(args.results, "consistency", result)
    return 0


def consistency_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## Consistent characters: cost (`python -m movielm_fast.bench.consistency`)", "",
             f"{st['model']}, {st['size']}², {st['steps']} steps, batch {st['batch']}, guidance {st['guidance']}, "
             f"fp32 on {m['cpu_model']} ({m['cpu_cores_logical']} cores); medians over {st['repeats']} interleaved "
             f"repeats of {st['frames']} frames; {load_note(res)}; {res['created']}. Anchors were rendered beforehand "
             f"(each {res['anchor_seconds']:.2f} s, once per character and worker); the record takes "
             f"{res['record_mb_per_character']} MB per character.", "",
             "| case | s/frame | vs plain |", "|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['case']} | {r['seconds_per_frame']:.3f} | {r['vs_plain']:.2f}× |")
    return lines + [""]


SECTIONS = (Section(CONSISTENCY_FORMAT, consistency_section),)


if __name__ == "__main__":
    raise SystemExit(main())
