"""Seconds to immobilize one style (render scenes -> VAE-encode once -> learn the token), at the default settings.

    python -m movielm_fast.bench.style_train                             # demo model on the CPU (a few seconds a style)
    python -m movielm_fast.bench.style_train --model sd15-arch --device cuda   # SD 1.5 architecture, 512 px
    python -m movielm_fast.bench.style_train --model sdxl-arch --device cuda --dtype bf16   # SDXL architecture, 1024 px

Protocol: the matmul ceiling in the training precision; one cold run (first-call costs: kernel selection, allocator,
compile when --compile); then `--repeats` timed runs, each into an empty library so every one really trains; then
a library hit. FLOPs of one training step (forward + backward, text encoders and UNet, counted by torch's
FlopCounterMode) are the difference between a 2-step and a 1-step run on the same images, so the MFU of the
training loop is per-step FLOPs / seconds per step / the ceiling. Figures are min/median/max over the repeats.

The sd15-arch/sdxl-arch models (bench/models.py) have the published layer shapes with random weights: their timing
is realistic, their images and learned tokens are noise. The reference the issue sets: common textual-inversion
recipes take 10-25 minutes per style on a 24 GB GPU; the goal is under 60 s on one H100-class GPU at 512 px.

Results: <out>/style-<timestamp>-<machine>.json and, in a folder of the same name, the scenes the token was learned
from (contact sheet) and one frame rendered with the learned token.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model
from movielm_fast.plan import Style
from movielm_fast.run.images import png_bytes
from movielm_fast.run.renderer import Renderer
from movielm_fast.run.storyboard import storyboard
from movielm_fast.style.immobilize import immobilize_style
from movielm_fast.style.scenes import render_scenes
from movielm_fast.style.training import StyleSettings

from .args import bench_parser
from .hardware import load_average, machine_info, matmul_ceiling, stats
from .models import resolve_model

COMMON_RECIPE_S = (600, 1500)  # 10-25 min per style on a 24 GB GPU (docs/design.md, reference figures)
STYLE = dict(name="Gothic", description="((Victorian elegance)), soft sepia, dimly lit rooms, lavish ballrooms")


def _train_flops(renderer, style, settings, images: Path, device: torch.device) -> int:
    """FLOPs of one training step: a 2-step run minus a 1-step run on the same images (everything else cancels)."""
    totals = []
    for steps in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="style-flops-"))
        # CPU's fused attention has no FLOP formula; the math backend's matmuls count the same work.
        kernel = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
        try:
            with kernel, FlopCounterMode(display=False) as counter:
                immobilize_style(renderer.scene_renderer, style, replace(settings, steps=steps), images=images, out=out)
            totals.append(counter.get_total_flops())
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return int(totals[1] - totals[0])


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("style_train", __doc__, model="demo", device=True, repeats=3, results="--out",
                      helps={"model": "demo | sd15-arch | sdxl-arch | a local diffusers folder"})
    ap.add_argument("--dtype", default="auto", help="model weights: auto (fp16 on CUDA) | fp32 | fp16 | bf16")
    ap.add_argument("--amp", default="auto", help="training autocast: auto | fp32 | bf16 | fp16")
    ap.add_argument("--steps", type=int, help="training steps (default: the engine's default for the model)")
    ap.add_argument("--scenes", type=int)
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet for training")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice). On a shared CPU, 1 "
                    "avoids OpenMP threads spin-waiting for each other")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (two extra short runs)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig(model=resolve_model(args.model), device=args.device, dtype=args.dtype)
    device = config.torch_device
    info = machine_info(device)
    t0 = time.perf_counter()
    renderer = Renderer(config)
    load_s = time.perf_counter() - t0
    settings = StyleSettings(steps=args.steps, scenes=args.scenes, resolution=args.resolution,
                             batch_size=args.batch_size, amp=args.amp, compile=args.compile)
    resolved = settings.resolve(renderer.model)
    style = Style(**STYLE)
    print(f"model {args.model} ({renderer.model.kind}, {renderer.model.content_hash}) on {device}, weights "
          f"{config.dtype_name}; settings {resolved.key_dict()}", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"style-{stamp}-{info['slug']}"
    args.out.mkdir(parents=True, exist_ok=True)
    assets = args.out / name
    assets.mkdir(exist_ok=True)

    runs = []

    def one(tag: str) -> dict:
        out = Path(tempfile.mkdtemp(prefix="style-bench-"))
        try:
            t = time.perf_counter()
            result = immobilize_style(renderer.scene_renderer, style, settings, out=out)
            wall = time.perf_counter() - t
            rep = {**result.report, "wall_s": round(wall, 3), "tag": tag}
            if tag == "timed":
                # The library answer for the same style, while the entry still exists.
                t = time.perf_counter()
                hit = immobilize_style(renderer.scene_renderer, style, settings, out=out)
                rep["library_hit_s"] = round(time.perf_counter() - t, 4)
                assert hit.cache_hit
                shutil.copy(result.path, assets / "embedding.safetensors")
                (assets / "token.txt").write_text(result.token + "\n")
            print(f"  {tag}: {wall:.2f} s (scenes {rep['seconds_scenes']:.2f}, encode {rep['seconds_encode']:.2f}, "
                  f"train {rep['seconds_train']:.2f} = {rep['steps']} x {rep['seconds_per_step']:.4f} s, batch "
                  f"{rep['batch_size']}/{rep['micro_batch']}, {rep['amp']}), eval loss {rep['eval_loss_before']:.4f}"
                  f" -> {rep['eval_loss_after']:.4f}", flush=True)
            return rep
        finally:
            shutil.rmtree(out, ignore_errors=True)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}
    cold = one("cold")
    ceiling = matmul_ceiling(device, amp_dtype.get(cold["amp"], torch.float32))
    for _ in range(args.repeats):
        runs.append(one("timed"))

    # The scenes (saved as the image beside the numbers) and, from them, the FLOPs of one training step.
    scenes = render_scenes(renderer.scene_renderer, style.name, style.description, resolved)
    scene_dir = assets / "scenes"
    scene_dir.mkdir(exist_ok=True)
    files = []
    for i, im in enumerate(scenes):
        f = scene_dir / f"scene-{i}.png"
        f.write_bytes(png_bytes(im.pixels, {"subject": im.caption_subject or ""}))
        files.append(((f"{i}", im.caption_subject or "", ""), f))
    (assets / "scenes.png").write_bytes(storyboard(files, columns=4))  # 256 px cells fit the captions
    step_flops = None if args.no_flops else _train_flops(renderer, style, settings, scene_dir, device)

    # One frame rendered with the learned token: the end-to-end check that the file binds and renders.
    emb_path = assets / "embedding.safetensors"
    token = (assets / "token.txt").read_text().strip()
    renderer.encoder.add_token(token, vectors_for_model(load_embedding(emb_path), renderer.model.kind), str(emb_path))
    frame = render_batch(renderer.model, renderer.backend, renderer.encoder,
                         [FrameJob("bench", "frame", f"{token}, a castle on a hill at night", "", 1)],
                         BatchSettings(resolved.resolution, resolved.resolution, resolved.scene_steps,
                                       resolved.scene_guidance, resolved.scene_scheduler))[0]
    (assets / "frame-with-token.png").write_bytes(png_bytes(frame, {"prompt": f"{token}, a castle on a hill"}))

    def med(key: str) -> float:
        return stats([r[key] for r in runs])["median"]

    summary = {
        "seconds_per_style": stats([r["seconds_total"] for r in runs]),
        "seconds_per_step": stats([r["seconds_per_step"] for r in runs]),
        "seconds_scenes_median": med("seconds_scenes"), "seconds_encode_median": med("seconds_encode"),
        "seconds_train_median": med("seconds_train"), "library_hit_s_median": med("library_hit_s"),
        "cold_seconds_per_style": cold["seconds_total"], "model_load_s": round(load_s, 3),
        "train_step_flops": step_flops,
        "train_mfu": (step_flops / med("seconds_per_step") / ceiling["flops_per_s"]["median"]) if step_flops else None,
        # The reference is a GPU figure: comparing a CPU run of the demo model with it would mean nothing.
        "vs_common_recipe": ([round(c / med("seconds_total"), 1) for c in COMMON_RECIPE_S] if device.type == "cuda"
                             else None),
    }
    result = {"format": "movielm-bench/style@1", "model": args.model, "kind": renderer.model.kind,
              "model_hash": renderer.model.content_hash, "weights_dtype": config.dtype_name,
              "settings": asdict(resolved), "machine": info, "load_avg_end": load_average(),
              "matmul_ceiling": ceiling, "cold": cold, "runs": runs, "summary": summary, "assets": str(assets)}
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    s = summary
    mfu = f"{100 * s['train_mfu']:.1f}%" if s["train_mfu"] is not None else "n/a"
    print(f"\n{args.model} on {info.get('gpu_model') or info['cpu_model']} ({device}): "
          f"{s['seconds_per_style']['median']:.2f} s per style (min {s['seconds_per_style']['min']:.2f}, cold "
          f"{s['cold_seconds_per_style']:.2f}), {s['seconds_per_step']['median'] * 1000:.1f} ms per step at batch "
          f"{runs[0]['batch_size']} ({resolved.resolution} px), scenes {s['seconds_scenes_median']:.2f} s, "
          f"library hit {s['library_hit_s_median'] * 1000:.1f} ms; training MFU {mfu} of "
          f"{ceiling['flops_per_s']['median'] / 1e9:.0f} GFLOP/s ({ceiling['dtype']} matmul)"
          + (f"; {s['vs_common_recipe'][0]}-{s['vs_common_recipe'][1]}x faster than 10-25 min recipes"
             if s["vs_common_recipe"] else "") + f"\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
