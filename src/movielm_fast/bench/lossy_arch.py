"""The lossy speed-ups (--quantize fp8, --step-cache) on the real architectures: PSNR / SSIM against the exact render.

    python -m movielm_fast.bench.lossy_arch --model sd15-arch --size 256 --steps 20 [--device cuda] [--prompts 2]

The engine renders the same prompts and seeds once per case -- the reference, FP8, step cache N=`--interval` at
each `--depths` branch, FP8 and the step cache together -- and each case's frames are compared with the
reference's: PSNR and SSIM (bench.image_quality), seconds per frame (whole render and the UNet's share), and the
UNet FLOPs of the render relative to the reference's (counted on the meta device: step caching removes FLOPs, FP8
runs the same FLOPs at a faster rate; `fp8_flop_share` says how much of a full UNet step runs in FP8).

Reference: on CUDA the model's fp16 (the issue's measure; FP8 is `fp8` on GPUs that have it, else `fp8-emulated`);
on the CPU fp32 with `fp8-emulated`, which rounds exactly as the GPU path does (engine/fp8.py) but multiplies in
fp32, so its seconds measure the emulation, not FP8. The *-arch models have random weights (bench.models): their
images are structured noise, not pictures, so the figures say how far each option moves the pixels of a full-size
UNet's output, not how a trained model's pictures look; a trained model's smoother images usually score higher
on both measures for the same perturbation. Results go to bench/results/lossy_arch-<stamp>.json.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.fp8 import FP8_CAPABILITY, fp8_candidates
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.step_cache import CachedUNet, StepCache
from movielm_fast.export.graphs import UNetGraph
from movielm_fast.run.renderer import Renderer

from .args import bench_parser, require_device
from .formats import Section, load_note, save_result
from .hardware import count_flops, load_average, machine_info, timed
from .image_quality import psnr, ssim
from .models import resolve_model
from .step_cache import render_flops, unet_inputs

LOSSY_ARCH_FORMAT = "movielm-bench-lossy-arch/1"

PROMPTS = ("a lighthouse on a cliff at dusk, oil painting",
           "a young woman with auburn hair in lavender stands at the entrance of a candle-lit ballroom",
           "a red fox running through fresh snow in a pine forest, morning light",
           "an old fisherman mending nets in a harbour, rain, cinematic")


def fp8_mode(device: torch.device) -> str:
    """The --quantize value this device runs: real FP8 where the GPU has it, else the emulation."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY:
        return "fp8"
    return "fp8-emulated"


def cases(interval: int, depths: list[int], fp8: str) -> list[tuple[str, str | None, StepCache | None]]:
    """(name, --quantize, step cache) of each case: the reference first, then those on the same model, then FP8."""
    out: list[tuple[str, str | None, StepCache | None]] = [("reference", None, None)]
    out += [(f"step cache N={interval} depth {d}", None, StepCache(interval, d)) for d in depths]
    return out + [(fp8, fp8, None), (f"{fp8} + step cache N={interval} depth {depths[0]}", fp8,
                                     StepCache(interval, depths[0]))]


def unet_flops(config: dict, latent: int, interval: int, depths: list[int], steps: int) -> dict[str, Any]:
    """A full step's FLOPs (CFG batch 2) of the UNet built from `config` on the meta device (nothing is computed),
    the share in the layers FP8 quantizes, and each step-cache depth's render FLOP ratio."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
    args = unet_inputs(unet, latent, device="meta")
    cpu = torch.device("cpu")
    full = count_flops(lambda: UNetGraph(unet)(*args), cpu)  # as bench.step_cache counts it
    fp8_flops = []

    def hook(module, inputs, _output):  # (..., K) rows or (B, K, H, W): 2 * (elements) * (output width)
        fp8_flops.append(2 * inputs[0].numel() * module.weight.shape[0])

    handles = [m.register_forward_hook(hook) for m in fp8_candidates(unet).values()]
    with torch.inference_mode():
        UNetGraph(unet)(*args)
    for h in handles:
        h.remove()
    ratios = {}
    for depth in depths:
        cached_unet = CachedUNet(unet, depth)
        with torch.inference_mode():
            deep = cached_unet.full(*args)[1]
        cached = count_flops(lambda: cached_unet.shallow(*args, deep=deep), cpu)
        ratios[depth] = round(steps * full / render_flops(full, cached, StepCache(interval, depth), steps), 3)
    return {"full_step_tflop": round(full / 1e12, 4), "fp8_flop_share": round(sum(fp8_flops) / full, 4),
            "step_cache_flop_ratio": ratios}


def render_case(r: Renderer, settings: BatchSettings, prompts: list[str]) -> tuple[np.ndarray, list[float], list]:
    """Each prompt alone (batch 1, seed = its index): (images, seconds per frame, UNet seconds per frame)."""
    images, seconds, unet = [], [], []
    for i, prompt in enumerate(prompts):
        r.times.clear()
        s, frames = timed(lambda: r.render([FrameJob("lossy", f"{i:02d}", prompt, "", 1000 + i)], settings)[0],
                          r.backend.device)
        images.append(np.asarray(frames[0]))
        seconds.append(s)
        unet.append(r.times.get("unet"))
    return np.stack(images), seconds, unet


def _db(x: float) -> float | None:
    return None if x == float("inf") else round(x, 2)  # None: identical (JSON has no infinity)


def measure(args) -> dict[str, Any]:
    path = resolve_model(args.model)
    device = torch.device(args.device)
    settings = BatchSettings(args.size, args.size, args.steps, args.guidance, args.scheduler)
    prompts = list(PROMPTS[:args.prompts])
    runs, reference, flops = [], None, None
    renderers: dict[str | None, Renderer] = {}
    for name, quantize, cache in cases(args.interval, args.depths, fp8_mode(device)):
        if quantize not in renderers:
            renderers.clear()  # one model in memory at a time (sdxl-arch is ~10 GB in fp32)
            gc.collect()
            renderers[quantize] = Renderer(ModelConfig(model=path, device=args.device, quantize=quantize))
        r = renderers[quantize]
        if flops is None:
            flops = unet_flops(dict(r.model.unet.config), args.size // r.model.vae_scale_factor, args.interval,
                               args.depths, args.steps)
            print("flops", flops)
        images, seconds, unet = render_case(r, replace(settings, step_cache=cache), prompts)
        if reference is None:
            reference = images
        run = {"case": name, "quantize": quantize, "step_cache": cache.key() if cache else None,
               "dtype": str(r.backend.dtype).removeprefix("torch."),
               "seconds_per_frame": round(statistics.median(seconds), 3), "seconds": [round(s, 3) for s in seconds],
               "unet_seconds_per_frame": round(statistics.median(unet), 3) if None not in unet else None,
               "unet_flop_ratio": flops["step_cache_flop_ratio"][cache.depth] if cache else 1.0,
               "psnr_db": _db(psnr(images, reference)), "ssim": round(ssim(images, reference), 4),
               "psnr_db_per_frame": [_db(psnr(a, b)) for a, b in zip(images, reference)],
               "max_abs_pixel_diff": int(np.abs(images.astype(int) - reference.astype(int)).max())}
        runs.append(run)
        print({k: v for k, v in run.items() if k not in ("seconds", "psnr_db_per_frame")}, flush=True)
    return {"flops": flops, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("lossy_arch", __doc__, model="sd15-arch", device=True, size=256, steps=20, guidance=7.5,
                      scheduler="dpmpp", results="--results",
                      helps={"model": "sd15-arch, sdxl-arch (bench.models) or a model folder"})
    ap.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1), metavar="1-4")
    ap.add_argument("--interval", type=int, default=3, help="step cache: a full UNet every N steps")
    ap.add_argument("--depths", type=lambda s: [int(d) for d in s.split(",")], default=[0, 2],
                    help="step cache branch depths, comma-separated (the first is also run with FP8)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    require_device(ap, args.device)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "format": LOSSY_ARCH_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(device),
        "load_average": {"start": load_average()},
        "settings": {k: v for k, v in vars(args).items() if k != "results"},
        "reference": "fp16 render (the issue's measure)" if device.type == "cuda" else
                     "fp32 render: this CPU has no fp16 path worth measuring; fp8 cases are fp8-emulated",
        "weights": "random (bench.models): images are structured noise; the figures measure how far each option "
                   "moves a full-size UNet's pixels, not picture quality"}
    result.update(measure(args))
    result["load_average"]["end"] = load_average()
    save_result(args.results, "lossy_arch", result)
    return 0


def lossy_arch_section(results: list[dict[str, Any]]) -> list[str]:
    """The newest result of each model and size."""
    newest = {(r["settings"]["model"], r["settings"]["size"], r["machine"]["device"]): r for r in results}
    if not newest:
        return []
    lines = ["## Lossy speed-ups on the real architectures (`python -m movielm_fast.bench.lossy_arch`)", "",
             "FP8 (`--quantize`) and step caching (`--step-cache`) against the exact render of the same prompts and "
             "seeds (batch 1). Random weights: the images are structured noise, so PSNR/SSIM say how far an option "
             "moves a full-size UNet's pixels, not how a trained model's pictures look. *UNet FLOPs*: the render's "
             "UNet FLOPs over the reference's (FP8 runs the same FLOPs at a faster rate on GPUs that have it). Seconds "
             "are one run each, under the machine's load at the time (see the load averages)."]
    for (model, size, _), res in newest.items():
        st, m = res["settings"], res["machine"]
        where = m["gpu_model"] or f"{m['cpu_model']} ({m['cpu_cores_logical']} cores)"
        lines += ["", f"**{model}, {size}²**, {st['steps']} {st['scheduler']} steps, guidance {st['guidance']}, "
                  f"{st['prompts']} prompt{'s' if st['prompts'] > 1 else ''} (seeds 1000+), on {where}; reference: "
                  f"{res['reference']}; "
                  f"{100 * res['flops']['fp8_flop_share']:.0f}% of a full UNet step's FLOPs are in the layers FP8 "
                  f"quantizes; {load_note(res)}; {res['created']}.", "",
                  "| case | PSNR dB | SSIM | max pixel diff | s/frame | UNet s/frame | UNet FLOPs |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            unet = "–" if r["unet_seconds_per_frame"] is None else f"{r['unet_seconds_per_frame']:.2f}"
            db = "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
            lines.append(f"| {r['case']} ({r['dtype']}) | {db} | {r['ssim']:.4f} | "
                         f"{r['max_abs_pixel_diff']} | {r['seconds_per_frame']:.2f} | {unet} | "
                         f"{1 / r['unet_flop_ratio']:.2f}× |")
    return lines + [""]


SECTIONS = (Section(LOSSY_ARCH_FORMAT, lossy_arch_section),)


if __name__ == "__main__":
    raise SystemExit(main())
