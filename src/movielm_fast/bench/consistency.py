"""Cost of consistent characters, per mode: time per frame with 1, 2, 3 characters vs plain, each character's
one-time cost (anchor_attention: the anchor render and its record; character_token: the anchor render and the
token's training) and what each character keeps in memory (the record; the token's vectors).

    python -m movielm_fast.bench.consistency [--model sd15-arch] [--size 256] [--steps 4] [--frames 2] [--repeats 2]
        [--modes anchor_attention,character_token] [--token-steps N]

One renderer; for each case a movie of `--frames` frames (each naming 0 = plain, 1, 2 or 3 characters) is rendered
at batch 1 with each character's state already made (its one-time cost is measured on its own, once per
character); cases are interleaved over the repeats and the median taken. Results go to
bench/results/consistency-<stamp>.json.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.plan import ConsistencySettings, parse_plan
from movielm_fast.run.renderer import Renderer, batch_settings

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import load_average, machine_info
from .models import resolve_model

CONSISTENCY_FORMAT = "movielm-bench-consistency/1"

NAMES = ("Rosa", "Tom", "Ada")


def _movie(chars: int, frames: int, size: int, steps: int, consistency: dict) -> dict:
    return {"id": f"c{chars}", "style": {"name": "Gothic", "description": "soft sepia"},
            "characters": [{"name": n, "appearance": f"a person called {n} in a long coat"} for n in NAMES],
            "frames": [{"id": f"{i:03d}", "description": " and ".join(NAMES[:chars]) + f" in scene {i}" if chars
                        else f"an empty hall, scene {i}", "seed": 100 + i} for i in range(frames)],
            "render": {"width": size, "height": size, "steps": steps, "seed": 1}, "consistency": consistency}


def _prepare(r: Renderer, mode: str, specs) -> tuple[list[float], list[int]]:
    """Each character's one-time work, timed alone: seconds and bytes kept per character."""
    seconds, kept = [], []
    for spec in specs:
        t0 = time.perf_counter()
        if mode == "character_token":
            c = r._character(spec)
            kept.append(sum(v.numel() * v.element_size() for v in c.vectors))
        else:
            kept.append(r._anchor(spec).nbytes)
        seconds.append(time.perf_counter() - t0)
    return seconds, kept


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("consistency", __doc__, model="sd15-arch", size=256, steps=4, frames=2, repeats=2,
                      results="--results")
    ap.add_argument("--modes", default="anchor_attention,character_token")
    ap.add_argument("--token-steps", type=int, default=ConsistencySettings.model_fields["token_steps"].default,
                    help="default: the mode's own")
    args = ap.parse_args(argv)

    r = Renderer(ModelConfig(model=resolve_model(args.model)))
    load_start = load_average()
    modes = args.modes.split(",")
    cases = {"plain": (0, "none"), **{f"{m}, {k} character(s)": (k, m) for m in modes for k in (1, 2, 3)}}
    tasks, once = {}, {}
    for name, (chars, mode) in cases.items():
        consistency = {"mode": mode, **({"token_steps": args.token_steps} if mode == "character_token" else {})}
        lm = parse_plan(_movie(chars, args.frames, args.size, args.steps, consistency))[0]
        s = r.info.resolved(lm, lm.settings.__class__())  # the model's own guidance and scheduler
        if mode != "none" and mode not in once:  # before planning: planning a token movie learns its tokens
            specs = r.anchor_specs(lm, None, s, batch_settings(s)).values()
            once[mode] = _prepare(r, mode, specs)
        tasks[name] = r.plan(lm, None, lm.settings.__class__()).tasks
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every case alike
        for name, ts in tasks.items():
            for t in ts:
                t0 = time.perf_counter()
                r.render([t.job], t.settings)[0].numpy()  # the pixels too: on a GPU, render only queues the work
                times[name].append(time.perf_counter() - t0)
    plain = statistics.median(times["plain"])
    rows = [{"case": name, "mode": cases[name][1], "characters": cases[name][0],
             "seconds_per_frame": round(statistics.median(v), 3), "vs_plain": round(statistics.median(v) / plain, 3),
             "samples": len(v)} for name, v in times.items()]
    per_character = {m: {"seconds": round(statistics.median(sec), 3), "kept_kb": round(statistics.median(b) / 1024, 1)}
                     for m, (sec, b) in once.items()}
    result = {"format": CONSISTENCY_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(torch.device("cpu")),
              "settings": {"model": args.model, "size": args.size, "steps": args.steps, "frames": args.frames,
                           "repeats": args.repeats, "batch": 1, "scheduler": s.scheduler, "guidance": s.guidance,
                           "token_steps": args.token_steps},
              "per_character": per_character, "load_average": {"start": load_start, "end": load_average()},
              "runs": rows}
    for row in rows:
        print(f"{row['case']:>36}: {row['seconds_per_frame']:.3f} s/frame ({row['vs_plain']:.2f}x plain)")
    for m, v in per_character.items():
        print(f"{m}: {v['seconds']:.3f} s per character once; keeps {v['kept_kb']} KB per character")
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
             f"repeats of {st['frames']} frames; {load_note(res)}; {res['created']}. Each character's one-time work "
             "was done beforehand and is timed on its own.", ""]
    if "per_character" in res:  # older results: anchor_attention alone, with its anchor and record beside
        lines += ["| mode | once per character | kept per character |", "|---|---|---|"]
        what = {"anchor_attention": ("anchor render + record", "the record"),
                "character_token": (f"anchor render + {st.get('token_steps')} token steps", "the token")}
        for mode, v in res["per_character"].items():
            once, kept = what.get(mode, ("", ""))
            lines.append(f"| {mode} | {v['seconds']:.2f} s ({once}) | {v['kept_kb']:.1f} KB ({kept}) |")
        lines.append("")
    else:
        lines += [f"Anchors: each {res['anchor_seconds']:.2f} s, once per character and worker; the record takes "
                  f"{res['record_mb_per_character']} MB per character.", ""]
    lines += ["| case | s/frame | vs plain |", "|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['case']} | {r['seconds_per_frame']:.3f} | {r['vs_plain']:.2f}× |")
    return lines + [""]


SECTIONS = (Section(CONSISTENCY_FORMAT, consistency_section),)


if __name__ == "__main__":
    raise SystemExit(main())
