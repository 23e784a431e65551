"""The benchmark protocol on a GPU machine, in one call:

    python -m movielm_fast.bench.gpu            # sd15-arch 512² batch 1,8,16 and sdxl-arch 1024² batch 1,4,8, fp16,
                                                # 20 steps: ours (default path) beside diffusers and diffusers+compile
    python -m movielm_fast.bench.gpu --knobs    # and each lossless knob on its own; writes the CUDA knob table
    python -m movielm_fast.bench.gpu --quick    # 3 steps, 2 repeats, batch 1,2, sd15-arch: a smoke run

Installs nothing: it needs only the project (torch with CUDA, diffusers, transformers) and builds the real
architectures with random weights into the movielm cache on first use (no download). Per (model, size, batch) it
reports s/frame, images/s, UNet it/s, MFU of the UNet step and of the whole frame, peak memory, the first batch of
each shape (compile or graph capture included) and PSNR against our fp32 image of the same seed, for ours and for
both diffusers peers. Writes the usual results into bench/results/, regenerates bench/RESULTS.md, and prints a
short table and the quality table last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_text

from .hardware import RESULTS
from .report import short_table, write_results_md
from .runner import BenchSettings, run_bench

# Each lossless knob of the torch backend on its own, against the default (`torch`: fp16, SDPA, channels-last, fused
# QKV, CUDA graphs as measured); `--knobs` times them and writes the winners into engine/cuda_knobs.json.
KNOB_VARIANTS = ("torch+no-cuda_graphs", "torch+cudnn_benchmark", "torch+sdpa_backend=flash",
                 "torch+sdpa_backend=cudnn", "torch+sdpa_backend=efficient", "torch+no-fuse_qkv",
                 "torch+no-channels_last", "torch+no-cuda_graphs+compile_unet")
# (model, native size, batch sizes): enough to find the best batch on 80-141 GB cards; a batch that does not fit is
# recorded as out of memory and stops the larger ones.
MODELS = {"sd15-arch": (512, [1, 8, 16]), "sdxl-arch": (1024, [1, 4, 8])}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m movielm_fast.bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="benchmark only this model (repeatable): sd15-arch, sdxl-arch, "
                    "demo or a local folder (default: sd15-arch and sdxl-arch)")
    ap.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32 (default fp16)")
    ap.add_argument("--backend", default="torch", help="comma-separated backends or variants such as "
                    "torch+no-cuda_graphs (default: torch, the default fast path)")
    ap.add_argument("--knobs", action="store_true", help="also time each knob of KNOB_VARIANTS on its own and write "
                    "the winners into the CUDA knob table (engine/cuda_knobs.json)")
    ap.add_argument("--peer-compile", default="max-autotune", choices=["max-autotune", "default", "off"],
                    help="diffusers' speed recipe, compiled in this torch.compile mode (default: max-autotune, the "
                         "recipe's; its compile time is reported apart); off: not timed")
    ap.add_argument("--batch-sizes", type=_ints, help="e.g. 1,2,4,8 (default per model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 steps, 2 repeats, batch 1,2, sd15-arch: a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"bench.gpu needs a CUDA GPU and a CUDA build of torch; this machine has none (torch "
              f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}).\n"
              f"  fix: run it on a GPU machine, or benchmark the CPU with `movielm-fast bench --device cpu`",
              file=sys.stderr)
        return 2

    names = args.model or (["sd15-arch"] if args.quick else list(MODELS))
    steps, repeats = (3, 2) if args.quick else (args.steps, args.repeats)
    backends = args.backend.split(",") + (list(KNOB_VARIANTS) if args.knobs else [])
    results, references = [], []
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for model in names:
        size, batches = MODELS.get(model, (None, [1, 2, 4, 8]))
        settings = BenchSettings(
            model=model, backends=backends, device="cuda", dtype=args.dtype, sizes=[(size, size)] if size else None,
            batch_sizes=[1, 2] if args.quick else (args.batch_sizes or batches), steps=steps, repeats=repeats,
            out=args.out, peer_compile=None if args.peer_compile == "off" else args.peer_compile)
        try:
            run = run_bench(settings, log=log)
            results.append(run.result)
            if args.dtype != "fp32":
                # The quality bar of the fast path: the same frame in fp32 with the plain torch backend.
                ref = BenchSettings(model=model, backends=["torch"], device="cuda", dtype="fp32",
                                    sizes=settings.sizes, batch_sizes=[1], steps=steps, repeats=1, out=args.out,
                                    baseline=False)
                references.append((run, run_bench(ref, log=log).result))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for run, ref in references:
        annotate_psnr(run.result, ref, args.out)
        atomic_write_text(run.json_path, json.dumps(run.result, indent=1, default=str))
    if args.knobs:
        from .knobs import main as knobs_main  # the table lives in the package: written from a checkout

        knobs_main(["--results", str(args.out)])
    print(f"report: {write_results_md(args.out, args.out.parent / 'RESULTS.md')}", file=sys.stderr)
    print(short_table(results))
    for run, _ in references:
        print(quality_table(run.result))
    return 0


def _pixels(results_dir: Path, run: dict) -> np.ndarray:
    with Image.open(results_dir / run["image"]) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def annotate_psnr(fast: dict, ref: dict, results_dir: Path) -> None:
    """Every row of `fast` gets PSNR and the largest pixel difference against our fp32 image of the same size and
    seed (`psnr_vs_fp32_torch`, `max_abs_diff_vs_fp32_torch`): ours and the diffusers peers alike."""
    refs = {r["size"]: r for r in ref["runs"] if r["status"] == "ok" and r.get("image")
            and not r["backend"].startswith("diffusers")}
    for r in fast["runs"]:
        base = refs.get(r["size"])
        if r["status"] != "ok" or not r.get("image") or base is None:
            continue
        a, b = _pixels(results_dir, r), _pixels(results_dir, base)
        mse = float(((a - b) ** 2).mean())
        r["psnr_vs_fp32_torch"] = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
        r["max_abs_diff_vs_fp32_torch"] = int(np.abs(a - b).max())


def quality_table(fast: dict) -> str:
    """PSNR and largest pixel difference of each row against our fp32 image of the same seed (lossless bar: 40 dB)."""
    lines = [f"quality vs fp32 torch ({fast['settings']['model']}):"]
    for r in fast["runs"]:
        if "psnr_vs_fp32_torch" in r:
            psnr = r["psnr_vs_fp32_torch"]
            lines.append(f"  {r['backend']:<34} {r['size']:<9} b{r['batch']:<3} PSNR {psnr:6.2f} dB  max diff "
                         f"{r['max_abs_diff_vs_fp32_torch']:3d}/255  {'ok' if psnr >= 40 else 'BELOW 40 dB'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
