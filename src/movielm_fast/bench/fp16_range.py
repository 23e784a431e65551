"""Which component overflows in fp16: the largest |activation| of every module, measured in fp32.

    python -m movielm_fast.bench.fp16_range --model sd15-arch [--size 256] [--steps 4]
    python -m movielm_fast.bench.fp16_range --model sd15-arch --size 512 --steps 20 --device cuda --dtype fp16

diffusers' fp16 images of sd15-arch (random weights) came out far from the fp32 image on a GPU (bench/RESULTS.md,
"fp16 range"). This runs
diffusers' own text-to-image pipeline once in fp32 on the CPU (text encoders, every UNet call of a short DPM++
schedule with CFG, the VAE decode) with a forward hook on every module that records the largest |output| it
produced. A module whose output passes 65504 (fp16's largest finite value) overflows in fp16; within 2x of it, a
slightly different input or rounding may push it over. The first such module in call order is where an overflow
starts: later ones often only inherit it. Values inside a module (attention scores within SDPA, a GroupNorm's
variance) are not seen.

With `--dtype fp16` (on a GPU) the hooked run is in fp16 and also records the first module whose output holds an
inf or NaN; the same pipeline runs once more in fp32 without hooks, and the PSNR of the fp16 image against it says
whether diffusers' own fp16 loses the image (and the hooks, where). Results go to
bench/results/fp16_range-<stamp>.json; `python -m movielm_fast.bench.report` summarises them in bench/RESULTS.md.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from movielm_fast.engine.schedulers import make_scheduler

from .args import bench_parser, require_device
from .formats import Section, save_result
from .hardware import load_average, machine_info
from .image_quality import psnr, to_uint8
from .models import ARCH_MODELS, build_arch_pipeline

FP16_RANGE_FORMAT = "movielm-bench-fp16-range/1"

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
NEAR = FP16_MAX / 2  # within 2x of overflowing
LISTED = 12  # modules listed per component and category (the counts are complete)
PROMPT = "Gothic style, soft sepia, a young woman with auburn hair in lavender stands at the ballroom entrance"


def max_abs(output: Any) -> float | None:
    """Largest |value| of the floating tensors in a module's output (tensor, tuple, list or dict/ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return float(output.detach().abs().max()) if output.is_floating_point() and output.numel() else None
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    found = [m for m in (max_abs(x) for x in items) if m is not None]
    return max(found) if found else None


class RangeRecorder:
    """Forward hooks that keep, per module, the largest |output| over all its calls and the order of its first
    call."""

    def __init__(self):
        self.peak: dict[str, float] = {}
        self.first_call: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        self.nonfinite: list[str] = []  # modules whose output held an inf or NaN, in order of first occurrence
        self.handles: list = []

    def attach(self, component: str, module: torch.nn.Module) -> None:
        for name, m in module.named_modules():
            key = f"{component}.{name}" if name else component
            self.kinds[key] = type(m).__name__
            self.handles.append(m.register_forward_hook(partial(self._hook, key)))

    def _hook(self, key: str, module, args, output) -> None:
        peak = max_abs(output)
        if peak is None:
            return
        self.first_call.setdefault(key, len(self.first_call))
        if peak != peak or peak == float("inf"):  # NaN or inf: max() would drop the NaN
            if key not in self.nonfinite:
                self.nonfinite.append(key)
            return
        self.peak[key] = max(self.peak.get(key, 0.0), peak)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def summary(self, component: str) -> dict[str, Any]:
        """One component's figures: its peak, and the modules over / near the fp16 limit, in call order."""
        mine = [k for k in self.peak if k == component or k.startswith(component + ".")]

        def rows(keys):
            keys = sorted(keys, key=self.first_call.__getitem__)
            return [{"module": k, "class": self.kinds[k], "max_abs": self.peak[k]} for k in keys[:LISTED]]

        over = [k for k in mine if self.peak[k] > FP16_MAX]
        near = [k for k in mine if NEAR < self.peak[k] <= FP16_MAX]
        top = sorted(mine, key=self.peak.__getitem__, reverse=True)[:LISTED]
        bad = [k for k in self.nonfinite if k == component or k.startswith(component + ".")]
        return {"component": component, "modules_called": len(mine), "nonfinite": len(bad),
                "first_nonfinite": [{"module": k, "class": self.kinds[k]} for k in bad[:LISTED]],
                "max_abs": max((self.peak[k] for k in mine), default=None),
                "over_fp16": len(over), "near_fp16": len(near), "first_over": rows(over), "first_near": rows(near),
                "largest": [{"module": k, "class": self.kinds[k], "max_abs": self.peak[k]} for k in top]}


def components(pipe) -> dict[str, torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2", "unet", "vae")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def verdict(parts: list[dict[str, Any]]) -> str:
    bad = [p for p in parts if p.get("nonfinite")]
    if bad:
        return "; ".join(f"{p['component']} produces inf/NaN ({p['nonfinite']} modules, the first "
                         f"{p['first_nonfinite'][0]['module']})" for p in bad)
    over = [p for p in parts if p["over_fp16"]]
    near = [p for p in parts if p["near_fp16"] and not p["over_fp16"]]
    if not over and not near:
        return "no module's output comes within 2x of fp16's range"
    said = [f"{p['component']} overflows fp16 ({p['over_fp16']} modules over 65504, the first "
            f"{p['first_over'][0]['module']}, max {p['max_abs']:.4g})" for p in over]
    said += [f"{p['component']} comes within 2x ({p['near_fp16']} modules, max {p['max_abs']:.4g})" for p in near]
    return "; ".join(said)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = bench_parser("fp16_range", __doc__, device=True, steps=4, guidance=7.5, scheduler="dpmpp",
                      results="--results")
    ap.add_argument("--model", default="sd15-arch", choices=ARCH_MODELS)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (small: this runs in fp32 on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args(argv)
    require_device(ap, args.device)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "fp16": torch.float16,
                                                  "bf16": torch.bfloat16}[args.dtype]
    load_start = load_average()
    t0 = time.perf_counter()
    pipe = build_arch_pipeline(args.model)  # fp32, the same random weights as the cached arch folder (seed 0)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0

    def run(p) -> Any:
        with torch.inference_mode():
            return p(PROMPT, negative_prompt=None, height=args.size, width=args.size, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed),
                     output_type="np").images

    reference = None
    if dtype != torch.float32:  # diffusers' own fp32 image of the same seed, to say what its fp16 loses
        reference = run(pipe.to(device))
    pipe = pipe.to(device, dtype)
    rec = RangeRecorder()
    parts = components(pipe)
    for name, module in parts.items():
        rec.attach(name, module)
    t0 = time.perf_counter()
    image = run(pipe)
    run_s = time.perf_counter() - t0
    rec.detach()
    summaries = [rec.summary(name) for name in parts]
    result = {"format": FP16_RANGE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine_info(device),
              "settings": {"model": args.model, "size": args.size, "steps": args.steps, "scheduler": args.scheduler,
                           "guidance": args.guidance, "seed": args.seed, "prompt": PROMPT, "dtype": args.dtype,
                           "pipeline": type(pipe).__name__},
              "fp16_max": FP16_MAX, "build_seconds": round(build_s, 1), "run_seconds": round(run_s, 1),
              "image_finite": bool(torch.isfinite(torch.as_tensor(image)).all()),
              "load_average": {"start": load_start, "end": load_average()},
              "psnr_vs_fp32": None if reference is None else round(psnr(to_uint8(image), to_uint8(reference)), 2),
              "components": summaries, "verdict": verdict(summaries)}
    for p in summaries:
        first = p["first_over"] or p["first_near"]
        print(f"{p['component']}: max |activation| {p['max_abs']:.4g}; {p['over_fp16']} modules over 65504, "
              f"{p['near_fp16']} within 2x" + (f"; first: {first[0]['module']} ({first[0]['max_abs']:.4g})"
                                              if first else ""))
    print(result["verdict"])
    if reference is not None:
        print(f"{args.dtype} image against diffusers' fp32 image of the same seed: PSNR {result['psnr_vs_fp32']} dB")
    save_result(args.results, "fp16_range", result)
    return result


def fp16_range_section(results: list[dict[str, Any]]) -> list[str]:
    """The latest fp16-range result per (model, dtype, device): which component's activations leave fp16's range."""
    latest = {(r["settings"]["model"], r["settings"].get("dtype", "fp32"), r["machine"].get("device", "cpu")): r
              for r in results}
    if not latest:
        return []
    lines = ["## fp16 range: the largest activation per component (`python -m movielm_fast.bench.fp16_range`)", "",
             "diffusers' pipeline run once with a forward hook on every module, in fp32, or in fp16 with "
             "`--dtype fp16` "
             "(then also once in fp32 without hooks, for the PSNR of its fp16 image); *over*: modules whose output "
             "passed 65504 (fp16 overflows there), *near*: within "
             "2x of it; *first*: the first such module in call order (where an overflow starts); *inf/NaN*: modules "
             "whose output held one (a low-precision run)."]
    for (model, dtype, device), res in sorted(latest.items()):
        st = res["settings"]
        lines += ["", "| model | run | size, steps | component | max \\|activation\\| | over | near | inf/NaN | "
                  "first over (or near) |", "|---|---|---|---|---|---|---|---|---|"]
        for p in res["components"]:
            first = (p["first_over"] or p["first_near"] or [None])[0]
            where = f"`{first['module']}` ({first['class']}, {first['max_abs']:.3g})" if first else "–"
            lines.append(f"| {model} | {dtype}, {device} | {st['size']}², {st['steps']} {st['scheduler']} | "
                         f"{p['component']} | {p['max_abs']:.3g} | {p['over_fp16']} | {p['near_fp16']} | "
                         f"{p.get('nonfinite', '–')} | {where} |")
        said = f"; its image {res['psnr_vs_fp32']} dB from diffusers' fp32 one" if res.get("psnr_vs_fp32") else ""
        lines += ["", f"{model}, {dtype} on {device} ({res['created']}): {res['verdict']}{said}."]
    return lines + [""]


SECTIONS = (Section(FP16_RANGE_FORMAT, fp16_range_section),)


if __name__ == "__main__":
    main()
