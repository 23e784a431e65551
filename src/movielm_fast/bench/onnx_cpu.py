"""ONNX Runtime (CPU) against torch eager and diffusers, on an SD 1.5-architecture model with random weights.

    python -m movielm_fast.bench.onnx_cpu [--steps 4] [--repeats 3]

Measures, in one process on the same machine:
  1. the fp32 matmul ceiling (GFLOP/s) with the threads the backends use;
  2. one SD 1.5 UNet forward at 32x32 latent, batch 2 (CFG): torch eager vs the onnxruntime backend, runs
     interleaved so background load hits both alike; medians; max abs difference;
  3. one 256x256 frame at --steps steps: diffusers' StableDiffusionPipeline vs `render_batch` on onnxruntime;
  4. export time and artifact sizes (a fresh artifact cache under the bench folder).
Writes bench/results/onnx-cpu-<timestamp>.json and the rendered frame beside it, and prints a table.
Random weights: images are noise, timings are what matters. FLOP counts are docs/design.md's reference figures.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from movielm_fast.engine.backends.base import UNetCond
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.cpu import usable_cores
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.schedulers import make_scheduler
from movielm_fast.export.cache import list_entries
from movielm_fast.paths import cache_root
from movielm_fast.run.images import png_bytes
from movielm_fast.run.renderer import Renderer

from .args import bench_parser
from .hardware import RESULTS
from .models import arch_model_path

UNET_TFLOP_32 = 0.36  # SD 1.5 UNet, 32x32 latent, batch 2
FRAME_TFLOP_256_4 = 2.09  # 256 px frame, 4 steps (UNet x4 + VAE decode + text)


def matmul_ceiling(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / min(times) / 1e9


def median(xs):
    return statistics.median(xs)


def main() -> None:
    ap = bench_parser("onnx_cpu", __doc__, steps=4, repeats=3)
    # Models and artifacts are gigabytes: they live in the cache folder, not in the repository.
    ap.add_argument("--work", type=Path, default=cache_root() / "bench-onnx-cpu")
    args = ap.parse_args()
    # sd15-arch (SD 1.5's published configs, random weights) from the cache, built there once.
    model_dir = arch_model_path("sd15-arch")
    # A fresh artifact cache, so the export is timed; the model folder is reused between runs.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.environ["MOVIELM_CACHE"] = str(args.work / f"cache-{stamp}")

    threads = usable_cores()
    torch.set_num_threads(threads)
    res: dict = {"when": stamp, "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                                           "logical_cpus": os.cpu_count()},
                 "versions": {"torch": torch.__version__}, "repeats": args.repeats}
    res["matmul_ceiling_gflops"] = round(matmul_ceiling(threads), 1)
    print(f"fp32 matmul ceiling: {res['matmul_ceiling_gflops']} GFLOP/s ({threads} threads)", flush=True)

    # --- export (timed, fresh cache) and the UNet micro-benchmark --------------------------------------------
    t0 = time.perf_counter()
    r = Renderer(ModelConfig(model=str(model_dir), backend="onnxruntime", device="cpu", dtype="fp32"))
    res["export_and_session_seconds"] = round(time.perf_counter() - t0, 1)
    res["artifacts"] = {e.manifest["component"]: {"bytes": e.manifest["total_bytes"],
                                                  "export_seconds": e.manifest["export_seconds"],
                                                  "total_seconds": e.manifest["total_seconds"],
                                                  "path": str(e.path)} for e in list_entries()}
    print(f"export + sessions: {res['export_and_session_seconds']} s", flush=True)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(999)
    unet = r.model.unet.float().eval()
    ort_times, pt_times = [], []
    with torch.inference_mode():
        ref = unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
        out = r.backend.denoise(x, t, UNetCond(ehs))
        for _ in range(args.repeats):  # interleaved: background load hits both alike
            t1 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ehs, return_dict=False)
            pt_times.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            r.backend.denoise(x, t, UNetCond(ehs))
            ort_times.append(time.perf_counter() - t1)
    res["unet_32x32_b2"] = {"torch_eager_s": [round(v, 3) for v in pt_times],
                            "onnxruntime_s": [round(v, 3) for v in ort_times],
                            "torch_median_s": round(median(pt_times), 3), "ort_median_s": round(median(ort_times), 3),
                            "speedup": round(median(pt_times) / median(ort_times), 2),
                            "ort_gflops": round(UNET_TFLOP_32 * 1e3 / median(ort_times), 1),
                            "torch_gflops": round(UNET_TFLOP_32 * 1e3 / median(pt_times), 1),
                            "max_abs_diff": float((out - ref).abs().max())}
    u = res["unet_32x32_b2"]
    print(f"UNet 32x32 b2: torch {u['torch_median_s']} s, ORT {u['ort_median_s']} s -> {u['speedup']}x "
          f"(diff {u['max_abs_diff']:.1e})", flush=True)
    del unet, ref, out
    gc.collect()

    # --- one 256 px frame: diffusers vs render_batch on onnxruntime --------------------------------------------
    prompt, negative, seed = "a lighthouse on a cliff at dusk, oil painting", "blurry", 42
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = make_scheduler("dpmpp", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    settings = BatchSettings(256, 256, args.steps, 7.5, "dpmpp")

    def diffusers_frame():
        return pipe(prompt, negative_prompt=negative, num_inference_steps=args.steps, height=256, width=256,
                    guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]

    def ours_frame():
        r.encoder._cache.clear()  # count prompt encoding too, as diffusers does each call
        return render_batch(r.model, r.backend, r.encoder, [FrameJob("b", "f", prompt, negative, seed)], settings)[0]

    with torch.inference_mode():
        ref_img, img = diffusers_frame(), ours_frame()  # warm-up
        d_times, o_times = [], []
        for _ in range(max(2, args.repeats - 1)):
            t1 = time.perf_counter()
            diffusers_frame()
            d_times.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            ours_frame()
            o_times.append(time.perf_counter() - t1)
    diff = int(np.abs(img.astype(int) - (ref_img * 255).round().astype(int)).max())
    res["frame_256_steps"] = {"steps": args.steps, "diffusers_s": [round(v, 2) for v in d_times],
                              "onnxruntime_s": [round(v, 2) for v in o_times],
                              "diffusers_median_s": round(median(d_times), 2),
                              "ort_median_s": round(median(o_times), 2),
                              "speedup": round(median(d_times) / median(o_times), 2),
                              "max_pixel_diff_vs_diffusers": diff}
    if args.steps == 4:
        res["frame_256_steps"]["ort_gflops"] = round(FRAME_TFLOP_256_4 * 1e3 / median(o_times), 1)
    f = res["frame_256_steps"]
    print(f"frame 256px {args.steps} steps: diffusers {f['diffusers_median_s']} s, ORT {f['ort_median_s']} s -> "
          f"{f['speedup']}x (max pixel diff {diff})", flush=True)

    out_dir = RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"onnx-cpu-{stamp}.png").write_bytes(png_bytes(img, {"bench": "onnx_cpu", "seed": str(seed)}))
    path = out_dir / f"onnx-cpu-{stamp}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")

    ceiling = res["matmul_ceiling_gflops"]
    rows = [("matmul ceiling (fp32)", f"{ceiling} GFLOP/s", ""),
            ("UNet 32x32 b2 torch eager", f"{u['torch_median_s']} s", f"{u['torch_gflops']} GFLOP/s "
                                                                     f"({u['torch_gflops'] / ceiling:.0%})"),
            ("UNet 32x32 b2 onnxruntime", f"{u['ort_median_s']} s", f"{u['ort_gflops']} GFLOP/s "
                                                                   f"({u['ort_gflops'] / ceiling:.0%})"),
            ("  UNet speedup", f"{u['speedup']}x", "target >= 1.8x"),
            (f"frame 256px {args.steps} steps diffusers", f"{f['diffusers_median_s']} s", ""),
            (f"frame 256px {args.steps} steps onnxruntime", f"{f['ort_median_s']} s",
             f"{f.get('ort_gflops', '-')} GFLOP/s"),
            ("  frame speedup", f"{f['speedup']}x", "target >= 1.8x"),
            ("export + session creation", f"{res['export_and_session_seconds']} s", "")]
    rows += [(f"  artifact {c}", f"{a['bytes'] / 2**20:.0f} MiB", f"export {a['total_seconds']} s")
             for c, a in res["artifacts"].items()]
    for name, val, note in rows:
        print(f"{name:<40} {val:>14}  {note}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
