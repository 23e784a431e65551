"""Step caching (--step-cache, engine/step_cache.py) measured against the uncached render: UNet FLOPs, time, pixels.

    python -m movielm_fast.bench.step_cache [--interval 3] [--steps 50] [--frames 16] [--no-arch-timing]

- flops: the sd15-arch (512²) and sdxl-arch (1024²) UNets at CFG batch 2, counted by torch's FlopCounterMode on the
  meta device (nothing is computed, so the real architectures cost nothing): a full step, a cached step at each
  branch depth, and the UNet FLOPs of a `--steps` render with a full step every `--interval` against none cached;
- demo: the toy demo model renders `--frames` held-out toy captions at `--steps` DPM++ steps, uncached and cached
  (interleaved, `--repeats` rounds, medians): UNet seconds (the renderer's stage clock), whole-render seconds,
  PSNR / SSIM of the cached frames against the uncached ones (same prompts, same seeds), and the analytic judge's
  conditioning rate of both (bench.toy.judge, as bench.toy_quality);
- arch timing: sd15-arch's UNet (random weights, fp32) at 256² on this CPU: median seconds of a full and of a
  cached step, and the `--steps` render time they imply.
Results go to bench/results/step_cache-<stamp>.json.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings
from movielm_fast.engine.step_cache import CachedUNet, StepCache
from movielm_fast.export.graphs import UNetGraph
from movielm_fast.run.renderer import Renderer

from .args import bench_parser
from .formats import Section, load_note, rate, save_result
from .hardware import count_flops, load_average, machine_info, timed
from .image_quality import psnr, ssim
from .models import SD15_UNET, SDXL_UNET
from .toy_quality import held_out_scenes, judged, render_prompts

STEP_CACHE_FORMAT = "movielm-step-cache-v1"

CPU = torch.device("cpu")


def unet_inputs(unet, latent: int, batch: int = 2, device: str = "cpu") -> tuple:
    """CFG-batch inputs of a UNet at a square latent size (SDXL: pooled text and time ids too)."""
    with torch.device(device):
        x = torch.randn(batch, 4, latent, latent)
        ehs = torch.randn(batch, 77, unet.config.cross_attention_dim)
        if unet.config.addition_embed_type != "text_time":
            return x, torch.tensor(500.0), ehs
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        return x, torch.tensor(500.0), ehs, torch.randn(batch, pooled), torch.randn(batch, 6)


def render_flops(full: float, cached: float, cache: StepCache, steps: int) -> float:
    n_full = sum(cache.full_steps(steps))
    return n_full * full + (steps - n_full) * cached


def measure_flops(interval: int, steps: int) -> dict[str, Any]:
    out = {}
    for name, config, latent in (("sd15-arch 512²", SD15_UNET, 64), ("sdxl-arch 1024²", SDXL_UNET, 128)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config).eval()
        args = unet_inputs(unet, latent, device="meta")
        full = count_flops(lambda: UNetGraph(unet)(*args), CPU)  # CPU: attention counted through its matmuls
        depths = {}
        for depth in range(len(CachedUNet(unet, 0).up_layers)):
            model = CachedUNet(unet, depth)
            with torch.inference_mode():
                deep = model.full(*args)[1]
            cached = count_flops(lambda: model.shallow(*args, deep=deep), CPU)
            cache = StepCache(interval, depth)
            depths[depth] = {"cached_step_tflop": round(cached / 1e12, 4), "cached_over_full": round(cached / full, 4),
                             "render_flops_ratio": round(steps * full / render_flops(full, cached, cache, steps), 3)}
        out[name] = {"full_step_tflop": round(full / 1e12, 4), "depths": depths}
    return out


def measure_demo(args) -> dict[str, Any]:
    captions = [s.caption() for s in held_out_scenes(args.frames)]
    conditioning = {}
    plain = Renderer(ModelConfig(model="demo"))
    cache = StepCache(args.interval, args.depth)
    settings = BatchSettings(64, 64, args.steps, args.guidance, "dpmpp")
    runs: dict[str, dict[str, list]] = {"uncached": {"unet": [], "total": []}, "cached": {"unet": [], "total": []}}
    images: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, s in (("uncached", settings), ("cached", replace(settings, step_cache=cache))):
            plain.times.clear()
            seconds, images[name] = timed(lambda: render_prompts(plain, captions, s), CPU)
            runs[name]["total"].append(seconds)
            runs[name]["unet"].append(plain.times["unet"])
        conditioning = {name: judged(img, captions)[0]["conditioning"] for name, img in images.items()}
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    return {"frames": len(captions), "steps": args.steps, "interval": args.interval, "depth": args.depth,
            "guidance": args.guidance, "repeats": args.repeats, "seconds": runs, "median_seconds": med,
            "unet_time_ratio": round(med["uncached"]["unet"] / med["cached"]["unet"], 3),
            "render_time_ratio": round(med["uncached"]["total"] / med["cached"]["total"], 3),
            "judge_conditioning": conditioning,
            "psnr_db": round(psnr(images["cached"], images["uncached"]), 2),
            "ssim": round(ssim(images["cached"], images["uncached"]), 4),
            "max_abs_pixel_diff": int(np.abs(images["cached"].astype(int) - images["uncached"].astype(int)).max())}


def measure_arch_time(args) -> dict[str, Any]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    inputs = unet_inputs(unet, 32)
    model = CachedUNet(unet, args.depth)
    with torch.inference_mode():
        model.full(*inputs)  # warm-up
        full = [timed(lambda: model.full(*inputs), CPU) for _ in range(args.arch_repeats)]
        deep = full[-1][1][1]
        cached = [timed(lambda: model.shallow(*inputs, deep=deep), CPU)[0] for _ in range(args.arch_repeats)]
    t_full, t_cached = statistics.median(s for s, _ in full), statistics.median(cached)
    cache = StepCache(args.interval, args.depth)
    return {"model": "sd15-arch UNet, random weights, fp32, 256² (32x32 latents), CFG batch 2",
            "full_step_seconds": round(t_full, 3), "cached_step_seconds": round(t_cached, 3),
            "repeats": args.arch_repeats,
            "render_time_ratio": round(args.steps * t_full / render_flops(t_full, t_cached, cache, args.steps), 3)}


def main(argv: list[str] | None = None) -> int:
    # --guidance: the toy model's own (bench.toy_quality's default)
    ap = bench_parser("step_cache", __doc__, steps=50, frames=8, repeats=3, guidance=4.0, results="--results")
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--arch-repeats", type=int, default=3)
    ap.add_argument("--no-arch-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"format": STEP_CACHE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "machine": machine_info(CPU), "load_average": {"start": load_average()},
                              "settings": {k: v for k, v in vars(args).items() if k != "results"}}
    result["flops"] = measure_flops(args.interval, args.steps)
    print("flops", {k: v["depths"][args.depth] for k, v in result["flops"].items()})
    result["demo"] = measure_demo(args)
    print("demo", {k: v for k, v in result["demo"].items() if k != "seconds"})
    if not args.no_arch_timing:
        result["sd15_arch_time"] = measure_arch_time(args)
        print("sd15-arch", result["sd15_arch_time"])
    result["load_average"]["end"] = load_average()
    save_result(args.results, "step_cache", result)
    return 0


def step_cache_section(results: list[dict[str, Any]]) -> list[str]:
    if not results:
        return []
    res = results[-1]
    st, demo = res["settings"], res["demo"]
    lines = ["## Step caching: FLOPs, time, pixels (`python -m movielm_fast.bench.step_cache`)", "",
             f"`--step-cache {st['interval']}` (a full UNet step every {st['interval']}, the shallow blocks only in "
             f"between), branch depth {st['depth']}, {st['steps']} steps; {res['machine']['cpu_model']}, torch threads "
             f"{st['threads']}; {load_note(res)}; {res['created']}. FLOPs counted by torch's FlopCounterMode on "
             "the meta "
             "device at CFG batch 2.", "",
             "| model | full step TFLOP | cached step TFLOP | UNet FLOPs of the render, uncached / cached |",
             "|---|---|---|---|"]
    for name, f in res["flops"].items():
        d = f["depths"][str(st["depth"])]
        lines.append(f"| {name} | {f['full_step_tflop']:.3f} | {d['cached_step_tflop']:.3f} | "
                     f"**{d['render_flops_ratio']:.2f}×** |")
    cond = demo["judge_conditioning"]
    lines += ["", f"The toy demo model, {demo['frames']} held-out captions, medians of {demo['repeats']} interleaved "
              f"rounds: UNet time **{demo['unet_time_ratio']:.2f}×** shorter, whole render "
              f"{demo['render_time_ratio']:.2f}×; PSNR {demo['psnr_db']} dB, SSIM {demo['ssim']} against the uncached "
              f"frames (max pixel difference {demo['max_abs_pixel_diff']}/255); judged conditioning "
              f"{rate(cond['uncached'])} uncached, {rate(cond['cached'])} cached."]
    arch = res.get("sd15_arch_time")
    if arch:
        lines += ["", f"{arch['model']}: a full step {arch['full_step_seconds']} s, a cached step "
                  f"{arch['cached_step_seconds']} s (medians of {arch['repeats']}): a {st['steps']}-step render "
                  f"{arch['render_time_ratio']:.2f}× shorter in UNet time."]
    return lines + [""]


SECTIONS = (Section(STEP_CACHE_FORMAT, step_cache_section),)


if __name__ == "__main__":
    raise SystemExit(main())
