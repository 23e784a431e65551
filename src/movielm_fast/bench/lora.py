"""Cost of LoRAs: time per frame with and without a merged LoRA, the time to switch LoRA sets, and on ONNX Runtime
the time to apply a set (new sessions with overridden initializers) against exporting the graphs.

    python -m movielm_fast.bench.lora [--model demo] [--size 256] [--steps 4] [--frames 2] [--repeats 3]

One torch renderer and one onnxruntime renderer on the same model (a fresh artifact cache, so the export is timed).
The LoRA has random factors (rank 8, UNet attention, feed-forward, projections and resnet convs, and the text
encoder): a LoRA's cost does not depend on its values. Frames are rendered at batch 1, plain and with the LoRA
interleaved over the repeats (drift on a shared machine hits both alike); medians. Switch times are the backend's
`set_loras` alone: plain -> A, A -> B, B -> plain. Results go to bench/results/lora-<stamp>.json.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .args import bench_parser
from .formats import Section, load_note, save_result
from .hardware import load_average, machine_info
from .models import resolve_model

LORA_FORMAT = "movielm-bench-lora/1"


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("lora", __doc__, model="demo", size=256, steps=4, frames=2, repeats=3, results="--results")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model_spec = resolve_model(args.model)
    if args.model == "demo":  # the demo model lives in the cache: build it there before the cache moves
        from movielm_fast.engine.demo import demo_model_path

        model_spec = str(demo_model_path())
    os.environ["MOVIELM_CACHE"] = str(work / "cache")  # a fresh artifact cache: the export is timed

    from movielm_fast.engine import lora
    from movielm_fast.engine.config import ModelConfig
    from movielm_fast.engine.jobs import BatchSettings, FrameJob
    from movielm_fast.run.renderer import Renderer
    from movielm_fast.testing import make_random_lora

    load_start = load_average()
    t0 = time.perf_counter()
    torch_r = Renderer(ModelConfig(model=model_spec))
    load_seconds = time.perf_counter() - t0
    model = torch_r.model
    files = [make_random_lora(work / f"{n}.safetensors", model.unet, model.text_encoders, rank=8, seed=i)
             for i, n in enumerate("ab")]
    set_a, set_b = lora.combine([(files[0], 0.8)]), lora.combine([(files[1], 1.0)])
    t0 = time.perf_counter()
    onnx_r = Renderer(ModelConfig(model=model_spec, backend="onnxruntime"), model=model)
    export_seconds = time.perf_counter() - t0  # export of every component + session creation
    # A session created from the artifacts already exported: what applying a set is compared with as well.
    t0 = time.perf_counter()
    Renderer(ModelConfig(model=model_spec, backend="onnxruntime"), model=model)
    sessions_seconds = time.perf_counter() - t0

    jobs = [FrameJob("bench", f"{i:03d}", f"a lighthouse on a cliff, scene {i}", "blurry", 100 + i)
            for i in range(args.frames)]

    def frame_seconds(r, loras) -> list[float]:
        s = BatchSettings(args.size, args.size, args.steps, 7.5, "dpmpp", loras=loras)
        r.render(jobs[:1], s)  # the set merged (and prompts encoded) before timing: steady state
        out = []
        for job in jobs:
            t = time.perf_counter()
            r.render([job], s)
            out.append(time.perf_counter() - t)
        return out

    rows = []
    for name, r in (("torch", torch_r), ("onnxruntime", onnx_r)):
        times: dict[str, list[float]] = {"plain": [], "lora": []}
        for _ in range(args.repeats):
            for case, loras in (("plain", ()), ("lora", set_a)):
                times[case] += frame_seconds(r, loras)
        switches: dict[str, list[float]] = {"plain -> A": [], "A -> B": [], "B -> plain": []}
        r.backend.set_loras((), r.loras)
        for _ in range(args.repeats):
            for case, loras in (("plain -> A", set_a), ("A -> B", set_b), ("B -> plain", ())):
                t = time.perf_counter()
                r.backend.set_loras(loras, r.loras)
                switches[case].append(time.perf_counter() - t)
        plain, with_lora = _median(times["plain"]), _median(times["lora"])
        rows.append({"backend": name, "plain_seconds_per_frame": plain, "lora_seconds_per_frame": with_lora,
                     "lora_vs_plain": round(with_lora / plain, 3), "samples": len(times["plain"]),
                     "switch_seconds": {k: _median(v) for k, v in switches.items()}})
    layers = len(torch_r.loras.layers(set_a[0]))
    result = {"format": LORA_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(torch.device("cpu")),
              "settings": {"model": args.model, "size": args.size, "steps": args.steps, "frames": args.frames,
                           "repeats": args.repeats, "batch": 1, "scheduler": "dpmpp", "guidance": 7.5,
                           "lora": f"random, rank 8, {layers} layers (UNet incl. convs + text encoder), kohya"},
              "model_load_seconds": round(load_seconds, 2), "onnx_export_seconds": round(export_seconds, 2),
              "onnx_sessions_seconds": round(sessions_seconds, 2),
              "load_average": {"start": load_start, "end": load_average()}, "runs": rows}
    for row in rows:
        sw = ", ".join(f"{k} {v:.3f} s" for k, v in row["switch_seconds"].items())
        print(f"{row['backend']:>12}: plain {row['plain_seconds_per_frame']:.3f} s/frame, with LoRA "
              f"{row['lora_seconds_per_frame']:.3f} ({row['lora_vs_plain']:.2f}x); switch: {sw}")
    print(f"onnxruntime: export {export_seconds:.1f} s, sessions from cached artifacts {sessions_seconds:.2f} s")
    save_result(args.results, "lora", result)
    return 0


def lora_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, m = res["settings"], res["machine"]
    lines = ["## LoRA: per-frame cost, switching sets, ONNX Runtime without re-export "
             "(`python -m movielm_fast.bench.lora`)", "",
             f"{st['model']}, {st['size']}², {st['steps']} steps, batch {st['batch']}, guidance {st['guidance']}, "
             f"fp32 on {m['cpu_model']} ({m['cpu_cores_logical']} cores); LoRA: {st['lora']} at scale 0.8; medians "
             f"over {st['repeats']} interleaved repeats of {st['frames']} frames; {load_note(res)}; {res['created']}. "
             "*switch*: the backend's `set_loras` alone (torch: merge in place / restore from the kept copies; "
             "ONNX Runtime: new sessions of the affected components with overridden initializers). ONNX Runtime: "
             f"exporting every component took **{res['onnx_export_seconds']:.1f} s**, creating the sessions from "
             f"the cached artifacts {res['onnx_sessions_seconds']:.2f} s.", "",
             "| backend | plain s/frame | with LoRA s/frame | ratio | switch plain → A | A → B | B → plain |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sw = r["switch_seconds"]
        lines.append(f"| {r['backend']} | {r['plain_seconds_per_frame']:.3f} | {r['lora_seconds_per_frame']:.3f} | "
                     f"{r['lora_vs_plain']:.2f}× | {sw['plain -> A']:.3f} s | {sw['A -> B']:.3f} s | "
                     f"{sw['B -> plain']:.3f} s |")
    return lines + [""]


SECTIONS = (Section(LORA_FORMAT, lora_section),)


if __name__ == "__main__":
    raise SystemExit(main())
