"""The transformer families' lossy speed-ups with their quality measured: step caching (diffusers' TaylorSeer hook,
engine.step_cache) and FP8 linears (engine.fp8) on FLUX (docs/dit-accelerators.md).

    python -m movielm_fast.bench.dit_accel [--model demo-dit] [--steps default,28,50] [--n 40]
    python -m movielm_fast.bench.dit_accel --gpu [--arch flux] [--size 1024] [--gpu-steps 28]   # on a lent GPU

The CPU run (the default) measures:
- flops: a full transformer step of the published FLUX.1 [dev] and FLUX.2 [klein] 4B layouts (random weights on
  the meta device: nothing is computed) at 512² and 1024² with 512 text tokens, counted by torch's FlopCounterMode,
  and the share in the layers --quantize fp8 puts in FP8 (engine.fp8.fp8_candidates) against all linears (the
  rest is attention's QK^T and PV);
- fp8_attention: whether this torch runs scaled_dot_product_attention on e4m3 inputs (FP8 attention, as
  FlashAttention-3 and SageAttention do it, is the lever beyond the linears);
- steps: on the DiT demo model, at its default steps, at 28 and at 50: each case against the plain fp32 render of the
  same `--n` held-out captions and seeds (toy_quality's): the transformer FLOPs of the render (a cached step
  counted with the hook in its predicting state), CPU seconds of the process and wall seconds per frame measured side
  by side, the judge's conditioning rate (bench.toy.judge) and PSNR / SSIM against the plain render; FP8 emulated
  (it rounds as the GPU does, multiplying in fp32: quality, not speed) at the default steps;
- cache_memory: what the hook keeps per row (CFG doubles the rows) between steps, from the shapes of the outputs it
  extrapolates, on the demo and on flux-arch at 1024².

`--gpu` (bench/gpu-check.sh --lossy): flux-arch (or klein-arch) with random weights in bf16 on the GPU at `--size`:
the median seconds of one transformer step in bf16 and with FP8 linears, and of a `--gpu-steps` denoise loop plus
the VAE decode (text encoding, once per prompt, left out) plain bf16, bf16 with the step cache, FP8, and FP8 with the
step cache. Its quality bounds are the CPU run's (random weights make pictures of nothing).
Results: bench/results/dit_accel-<stamp>.json.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.fp8 import fp8_candidates, quantize_unet
from movielm_fast.engine.step_cache import (
    DIT_WARMUP_STEPS,
    HookedTransformer,
    StepCache,
    StepCacheRun,
    dit_full_steps,
)
from movielm_fast.export.graphs import TransformerGraph
from movielm_fast.run.renderer import Renderer

from .args import bench_parser, require_device
from .formats import Section, load_note, rate, save_result
from .hardware import count_flops, load_average, machine_info, synchronize
from .image_quality import psnr, ssim
from .toy_quality import held_out_scenes, judged, render_prompts, scene_prompts, toy_settings

DIT_ACCEL_FORMAT = "movielm-bench-dit-accel/1"
CPU = torch.device("cpu")
TEXT_TOKENS = 512

# The published transformer layouts (diffusers' config.json of FLUX.1 [dev] and of FLUX.2 [klein] 4B).
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-arch": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "klein-arch": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)),
}
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159)
CASES = (("step cache N=2", StepCache(2, 0)), ("step cache N=3", StepCache(3, 0)),
         ("step cache N=2, depth 1", StepCache(2, 1)))
FP8_CASES = (("fp8 (emulated)", None), ("fp8 (emulated) + step cache N=2", StepCache(2, 0)))  # at the default steps


def arch_transformer(name: str):
    import diffusers

    cls, config = ARCHS[name]
    return getattr(diffusers, cls)(**config).eval()


def transformer_args(transformer, tokens: int, text_tokens: int, batch: int = 1) -> tuple:
    """TransformerGraph's positional inputs for `tokens` image tokens, on the device/dtype of the current context."""
    c = transformer.config
    axes = len(c.axes_dims_rope)
    pooled = torch.randn(batch, c.pooled_projection_dim) if "pooled_projection_dim" in c else None
    guidance = torch.tensor(3.5) if c.guidance_embeds else None
    return (torch.randn(batch, tokens, c.in_channels), torch.tensor(500.0),
            torch.randn(batch, text_tokens, c.joint_attention_dim), pooled, guidance,
            torch.zeros(text_tokens, axes), torch.zeros(tokens, axes))


def flop_shares(sizes=(512, 1024)) -> dict[str, Any]:
    out = {}
    for name in ARCHS:
        with torch.device("meta"):
            transformer = arch_transformer(name)
        graph = TransformerGraph(transformer)
        for size in sizes:
            with torch.device("meta"):
                args = transformer_args(transformer, (size // 16) ** 2, TEXT_TOKENS)
            total = count_flops(lambda: graph(*args), CPU)
            fp8, linear = _linear_flops(graph, args, fp8_candidates(transformer).values())
            out[f"{name} {size}²"] = {"full_step_tflop": round(total / 1e12, 2), "fp8_share": round(fp8 / total, 4),
                                      "linear_share": round(linear / total, 4),
                                      "attention_share": round(1 - linear / total, 4)}
    return out


def _linear_flops(graph, args, fp8_layers) -> tuple[int, int]:
    fp8_ids = {id(m) for m in fp8_layers}
    counts = {"fp8": 0, "all": 0}

    def hook(module, inputs, _output):
        flops = 2 * inputs[0].numel() * module.weight.shape[0]
        counts["all"] += flops
        counts["fp8"] += flops if id(module) in fp8_ids else 0

    linears = [m for m in graph.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in linears]
    with torch.inference_mode():
        graph(*args)
    for h in handles:
        h.remove()
    return counts["fp8"], counts["all"]


def fp8_attention(device: torch.device) -> dict[str, Any]:
    """Whether scaled_dot_product_attention takes e4m3 Q/K/V here, and the SDPA backends this torch knows."""
    from torch.nn.attention import SDPBackend

    q = torch.randn(1, 2, 64, 64, device=device).to(torch.float8_e4m3fn)
    try:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        runs = f"runs (output {str(out.dtype).removeprefix('torch.')})"
    except Exception as exc:  # what torch says is the finding
        runs = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return {"torch": torch.__version__, "device": device.type, "sdpa_on_e4m3": runs,
            "sdpa_backends": list(SDPBackend.__members__)}


def hooked_step_flops(transformer, args, cache: StepCache) -> int:
    """FLOPs of a step the hook predicts (the first one after the warm-up), counted with the hook in that state."""
    graph, hooked = TransformerGraph(transformer), HookedTransformer(transformer)
    run = StepCacheRun(cache)
    with torch.inference_mode():
        for _ in range(DIT_WARMUP_STEPS):
            hooked(graph, args, run)
    flops = count_flops(lambda: hooked(graph, args, run), CPU)
    hooked(graph, args, None)  # off again
    return flops


def cache_bytes(transformer, args, depth: int) -> int:
    """Bytes the first-order hook keeps between steps (two factors of float32 per extrapolated output) for the call
    `args`: the output projection's result (depth 0), or every block attention's outputs (depth 1, the modules
    diffusers' TaylorSeer hooks by default)."""
    pattern = r"proj_out" if depth == 0 else r"(single_)?transformer_blocks\.\d+\.attn"
    sizes: list[int] = []

    def hook(_m, _i, output):
        outs = output if isinstance(output, tuple) else (output,)
        sizes.extend(o.numel() for o in outs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(hook) for n, m in transformer.named_modules() if re.fullmatch(pattern, n)]
    with torch.inference_mode():
        TransformerGraph(transformer)(*args)
    for h in handles:
        h.remove()
    return 2 * 4 * sum(sizes)


def measure_demo(args) -> dict[str, Any]:
    r = Renderer(ModelConfig(model=args.model))
    base = toy_settings(r)
    scenes = held_out_scenes(args.n)
    captions = scene_prompts(scenes)
    transformer = r.model.transformer
    size = base.width // (r.model.vae_scale_factor * 2)
    text_tokens = r.encoder.roles[-1].length
    rows = 2 if base.true_cfg > 1 else 1
    step_args = transformer_args(transformer, size * size, text_tokens, batch=rows)
    full = count_flops(lambda: TransformerGraph(transformer)(*step_args), CPU)
    predicted = {c.depth: hooked_step_flops(transformer, step_args, c) for _, c in CASES}
    fp8 = Renderer(ModelConfig(model=args.model, quantize="fp8-emulated"))
    for renderer in (r, fp8):  # warm-up (first-call allocations, lazy imports), so the first timed case pays none
        render_prompts(renderer, captions[:2], replace(base, steps=4))
    out: dict[str, Any] = {"model": args.model, "model_hash": r.model.content_hash, "captions": len(captions),
                           "size": base.width, "guidance": base.guidance, "true_cfg": base.true_cfg,
                           "full_step_mflop": round(full / 1e6, 2),
                           "predicted_step_mflop": {d: round(f / 1e6, 3) for d, f in predicted.items()},
                           "cache_bytes_per_row": {d: cache_bytes(transformer, step_args, d) // rows
                                                   for d in predicted},
                           "steps": {}}
    for steps in [base.steps if s == "default" else int(s) for s in args.steps.split(",")]:
        s = replace(base, steps=steps)
        cases = [("plain", r, None, s)] + [(n, r, c, replace(s, step_cache=c)) for n, c in CASES]
        if steps == base.steps:
            cases += [(n, fp8, c, replace(s, step_cache=c)) for n, c in FP8_CASES]
        images, rows_out = {}, {}
        for name, renderer, cache, settings in cases:
            cpu0, t0 = time.process_time(), time.perf_counter()
            images[name] = render_prompts(renderer, captions, settings)
            cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - t0
            n_full = steps if cache is None else sum(dit_full_steps(cache, steps))
            flops = n_full * full + (steps - n_full) * (predicted[cache.depth] if cache else 0)
            rates, _ = judged(images[name], scenes)
            rows_out[name] = {"conditioning": rates["conditioning"], "full_steps": n_full,
                              "transformer_flop_ratio": round(steps * full / flops, 3),
                              "cpu_s_per_frame": round(cpu_s / len(captions), 4),
                              "wall_s_per_frame": round(wall_s / len(captions), 4)}
        ref = rows_out["plain"]
        for name, row in rows_out.items():
            row["cpu_speedup"] = round(ref["cpu_s_per_frame"] / row["cpu_s_per_frame"], 3)
            row["delta_points"] = round(100 * (row["conditioning"] - ref["conditioning"]), 1)
            if name != "plain":
                row["psnr_db"] = round(psnr(images[name], images["plain"]), 2)
                row["ssim"] = round(ssim(images[name], images["plain"]), 4)
        out["steps"][str(steps)] = rows_out
        print(steps, {k: (v["conditioning"], v["cpu_speedup"], v.get("psnr_db")) for k, v in rows_out.items()})
    return out


def flux_arch_cache_bytes(size: int = 1024) -> dict[int, int]:
    with torch.device("meta"):
        transformer = arch_transformer("flux-arch")
        args = transformer_args(transformer, (size // 16) ** 2, TEXT_TOKENS)
    return {d: cache_bytes(transformer, args, d) for d in range(2)}


# --- a lent GPU ---------------------------------------------------------------------------------------------------

def measure_gpu(args) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    device, dtype = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        transformer = arch_transformer(args.arch).to(dtype)
        vae = AutoencoderKL(**FLUX_VAE).to(dtype).eval()
        step_args = list(transformer_args(transformer, (args.size // 16) ** 2, TEXT_TOKENS))
    for i in (0, 2, 3):  # latents, text states, pooled text in the model's dtype; timestep and position ids float32
        step_args[i] = None if step_args[i] is None else step_args[i].to(dtype)
    latents = torch.randn(1, 16, args.size // 8, args.size // 8, device=device, dtype=dtype)
    graph, hooked = TransformerGraph(transformer), HookedTransformer(transformer)

    def loop(cache: StepCache | None):
        run = StepCacheRun(cache) if cache else None
        x = step_args[0]
        with torch.inference_mode():
            for i in range(args.gpu_steps):
                v = hooked(graph, (x, *step_args[1:]), run) if run else graph(x, *step_args[1:])
                x = x - v / args.gpu_steps  # an Euler step's arithmetic; the schedule does not change the cost
            return vae.decode(latents).sample

    def median_seconds(fn, repeats: int) -> float:
        samples = []  # warm-up: one_step's first call (no compilation or capture here: eager kernels)
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    def one_step():
        with torch.inference_mode():
            graph(*step_args)

    cache = StepCache(args.gpu_interval, 0)
    cuda = device.type == "cuda"
    out: dict[str, Any] = {"arch": args.arch, "size": args.size, "steps": args.gpu_steps, "dtype": "bf16",
                           "interval": args.gpu_interval, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu"}
    loops = {"": None, f" + step cache N={args.gpu_interval}": cache}
    out["step_s"], out["loop_s"] = {}, {}
    for name in ("bf16", "fp8"):
        if name == "fp8":
            quantize_unet(transformer, emulate=False)
        one_step()  # warm-up
        out["step_s"][name] = median_seconds(one_step, 10)
        for suffix, c in loops.items():  # one loop each: 28 steps are many samples of the same kernels
            out["loop_s"][name + suffix] = median_seconds(lambda: loop(c), 1)
    out["memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None
    print(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("dit_accel", __doc__, model="demo-dit", device=True, results="--results")
    ap.add_argument("--steps", default="default,28,50", help="step counts of the demo runs ('default': the model's)")
    ap.add_argument("--n", type=int, default=40, help="held-out captions rendered per case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="the GPU rows instead (flux-arch, random weights)")
    ap.add_argument("--arch", default="flux-arch", choices=tuple(ARCHS))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--gpu-steps", type=int, default=28)
    ap.add_argument("--gpu-interval", type=int, default=2)
    args = ap.parse_args(argv)
    if args.gpu:
        args.device = "cuda" if args.device == "cpu" else args.device
        require_device(ap, args.device)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"format": DIT_ACCEL_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "machine": machine_info(torch.device(args.device)), "load_average": {
                                  "start": load_average()}}
    if args.gpu:
        result["gpu"] = measure_gpu(args)
        result["fp8_attention"] = fp8_attention(torch.device(args.device))
    else:
        result["flops"] = flop_shares()
        result["fp8_attention"] = fp8_attention(CPU)
        result["flux_arch_cache_bytes_per_row"] = flux_arch_cache_bytes()
        result["demo"] = measure_demo(args)
    result["load_average"]["end"] = load_average()
    save_result(args.results, "dit_accel", result)
    return 0


# --- RESULTS.md: one section per option ----------------------------------------------------------------------------

def step_cache_section(results: list[dict[str, Any]]) -> list[str]:
    cpu, gpu = _newest(results)
    if cpu is None and gpu is None:
        return []
    lines = ["## DiT step cache: diffusers' TaylorSeer hook, with its quality "
             "(`python -m movielm_fast.bench.dit_accel`)", ""]
    if cpu is not None:
        d = cpu["demo"]
        lines += [_demo_intro(cpu) + " A full transformer step is "
                  f"{d['full_step_mflop']} MFLOP; a step the hook predicts, " +
                  ", ".join(f"depth {k}: {v} MFLOP" for k, v in d["predicted_step_mflop"].items()) +
                  ". Transformer FLOPs ÷: the plain render's over the case's.", ""]
        for steps, rows in d["steps"].items():
            lines += [f"{steps} steps:", ""] + _case_table({k: v for k, v in rows.items() if not k.startswith("fp8")})
        mem = cpu["flux_arch_cache_bytes_per_row"]
        demo = ", ".join(f"depth {k}: {v / 1024:.0f} KiB" for k, v in d["cache_bytes_per_row"].items())
        flux = ", ".join(f"depth {k}: {int(v) / 2 ** 20:.0f} MiB" for k, v in mem.items())
        lines += ["**Memory** the hook keeps per CFG row between steps (two float32 factors per extrapolated output): "
                  f"the DiT demo {demo}; flux-arch at 1024² {flux}.", ""]
    if gpu is not None:
        lines += _gpu_lines(gpu, fp8=False)
    return lines


def fp8_section(results: list[dict[str, Any]]) -> list[str]:
    cpu, gpu = _newest(results)
    if cpu is None and gpu is None:
        return []
    lines = ["## DiT FP8 linears: their share of a step and their quality (`python -m movielm_fast.bench.dit_accel`)",
             ""]
    if cpu is not None:
        m = cpu["machine"]
        lines += [f"**Share of a transformer step** in the layers `--quantize fp8` runs in FP8 (published layouts, "
                  f"random weights on the meta device, 512 text tokens, torch's FlopCounterMode; {cpu['created']}):",
                  "", "| model, size | full step | FP8 layers | all linears | attention products |",
                  "|---|---|---|---|---|"]
        for name, f in cpu["flops"].items():
            lines.append(f"| {name} | {f['full_step_tflop']} TFLOP | {rate(f['fp8_share'])} | "
                         f"{rate(f['linear_share'])} | {rate(f['attention_share'])} |")
        fa = cpu["fp8_attention"]
        lines += ["", f"FP8 attention in torch {fa['torch']} ({fa['device']}, {m['cpu_model']}): "
                  f"scaled_dot_product_attention on e4m3 inputs {fa['sdpa_on_e4m3']}; its backends: "
                  f"{', '.join(fa['sdpa_backends'])}.", ""]
        d = cpu["demo"]
        for steps, rows in d["steps"].items():
            fp8 = {k: v for k, v in rows.items() if k == "plain" or k.startswith("fp8")}
            if len(fp8) > 1:
                lines += [_demo_intro(cpu) + f" FP8 emulated (the GPU's rounding, computed in fp32: quality, not "
                          f"speed), {steps} steps:", ""] + _case_table(fp8)
    if gpu is not None:
        lines += _gpu_lines(gpu, fp8=True)
    return lines


def _newest(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    cpu = [r for r in results if "demo" in r]
    gpu = [r for r in results if "gpu" in r]
    return (cpu[-1] if cpu else None), (gpu[-1] if gpu else None)


def _demo_intro(res: dict[str, Any]) -> str:
    d, m = res["demo"], res["machine"]
    return (f"On the DiT demo ({d['model']}, hash {d['model_hash']}), {m['cpu_model']}, torch threads "
            f"{m['torch_threads']}; {load_note(res)}; {res['created']}: {d['captions']} held-out captions at "
            f"{d['size']}², true CFG {d['true_cfg']}, each case against the plain fp32 render of the same captions "
            "and seeds; CPU speed-up: the process's CPU seconds, plain over case, measured side by side.")


def _case_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| case | full steps | transformer FLOPs ÷ | CPU speed-up | s/frame (CPU) | conditioning | change | "
             "PSNR / SSIM |", "|---|---|---|---|---|---|---|---|"]
    for name, v in rows.items():
        q = f"{v['psnr_db']} dB / {v['ssim']}" if "psnr_db" in v else "—"
        lines.append(f"| {name} | {v['full_steps']} | {v['transformer_flop_ratio']}× | {v['cpu_speedup']}× | "
                     f"{v['cpu_s_per_frame']} | {rate(v['conditioning'])} | {v['delta_points']:+.0f} points | {q} |")
    return lines + [""]


def _gpu_lines(res: dict[str, Any], fp8: bool) -> list[str]:
    g = res["gpu"]
    step, loop = g["step_s"], g["loop_s"]
    lines = [f"**{g['gpu']}**: {g['arch']} (random weights) at {g['size']}², bf16; {res['created']}."]
    if fp8:
        lines[0] += (f" One transformer step: bf16 {step['bf16']:.4f} s, FP8 {step['fp8']:.4f} s "
                     f"(**{step['bf16'] / step['fp8']:.2f}×**).")
    lines[0] += f" A {g['steps']}-step denoise loop and the VAE decode (text encoding left out):"
    lines += ["", "| case | seconds | speed-up over bf16 |", "|---|---|---|"]
    for name, s in loop.items():
        if fp8 == name.startswith("fp8") or name == "bf16":
            lines.append(f"| {name} | {s:.3f} | {loop['bf16'] / s:.2f}× |")
    return lines + ["", f"Peak GPU memory {g['memory_gb']} GB.", ""]


def dit_accel_sections(results: list[dict[str, Any]]) -> list[str]:
    """One RESULTS.md section per option, from the same result files."""
    return step_cache_section(results) + fp8_section(results)


SECTIONS = (Section(DIT_ACCEL_FORMAT, dit_accel_sections),)


if __name__ == "__main__":
    raise SystemExit(main())
