"""The benchmark protocol on a GPU machine, in one call:

    python -m movielm_fast.bench.gpu                  # sd15-arch, fp16, 512x512, batch 1,2,4,8, 20 steps, 5 repeats
    python -m movielm_fast.bench.gpu --sdxl           # and sdxl-arch at 1024x1024, batch 1,2,4
    python -m movielm_fast.bench.gpu --quick          # 3 steps, 2 repeats: a smoke run in about a minute

Installs nothing: it needs only the project (torch with CUDA, diffusers, transformers) and builds the real
architectures with random weights into the movielm cache on first use (no download). Writes the usual results into
bench/results/, regenerates bench/RESULTS.md, and prints a short table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from movielm_fast.errors import UserError

from .hardware import RESULTS
from .report import short_table, write_results_md
from .runner import BenchSettings, run_bench

# The fast-path options of the torch backend, each timed on its own next to the default (fp16, SDPA, channels-last,
# fused QKV) and the exported backends; a variant that is not faster stays off by default.
FAST_PATH_VARIANTS = ("torch", "torch+cuda_graphs", "torch+compile_unet", "torch+attention=triton",
                      "torch+no-fuse_qkv", "torch+no-channels_last", "onnxruntime", "tensorrt")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m movielm_fast.bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdxl", action="store_true", help="also benchmark sdxl-arch (1024x1024, batch 1,2,4)")
    ap.add_argument("--model", help="benchmark only this model (demo, sd15-arch, sdxl-arch or a local folder)")
    ap.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32 (default fp16)")
    ap.add_argument("--backend", default=None, help="comma-separated backends or variants such as torch+cuda_graphs "
                    "(default: FAST_PATH_VARIANTS)")
    ap.add_argument("--batch-sizes", type=_ints, help="e.g. 1,2,4,8 (default per model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 steps, 2 repeats, batch 1,2: a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"bench.gpu needs a CUDA GPU and a CUDA build of torch; this machine has none (torch "
              f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}).\n"
              f"  fix: run it on a GPU machine, or benchmark the CPU with `movielm-fast bench --device cpu`",
              file=sys.stderr)
        return 2

    # (model, native size, batch sizes): the largest batches that usually fit 24-80 GB cards; a batch that does
    # not fit is recorded as out of memory and stops the larger ones.
    plan = [("sd15-arch", 512, [1, 2, 4, 8])] + ([("sdxl-arch", 1024, [1, 2, 4])] if args.sdxl else [])
    if args.model:
        plan = [(args.model, None, [1, 2, 4, 8])]
    steps, repeats = (3, 2) if args.quick else (args.steps, args.repeats)
    results, references = [], []
    for model, size, batches in plan:
        settings = BenchSettings(
            model=model, backends=(args.backend or ",".join(FAST_PATH_VARIANTS)).split(","), device="cuda",
            dtype=args.dtype, sizes=[(size, size)] if size else None,
            batch_sizes=[1, 2] if args.quick else (args.batch_sizes or batches), steps=steps, repeats=repeats,
            out=args.out)
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        try:
            results.append(run_bench(settings, log=log).result)
            if args.dtype != "fp32":
                # The quality bar of the fast path: the same frame in fp32 with the plain torch backend.
                ref = BenchSettings(model=model, backends=["torch"], device="cuda", dtype="fp32",
                                    sizes=settings.sizes, batch_sizes=[1], steps=steps, repeats=1, out=args.out)
                references.append((results[-1], run_bench(ref, log=log).result))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"report: {write_results_md(args.out, args.out.parent / 'RESULTS.md')}", file=sys.stderr)
    print(short_table(results))
    for fast, ref in references:
        print(quality_table(fast, ref, args.out))
    return 0


def quality_table(fast: dict, ref: dict, results_dir: Path) -> str:
    """PSNR and largest pixel difference of each fast-path image against the fp32 torch image of the same seed
    (target: PSNR >= 35 dB)."""
    def pixels(run):
        with Image.open(results_dir / run["image"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64)

    ref_runs = {r["size"]: r for r in ref["runs"] if r["backend"] == "torch" and r["status"] == "ok" and r.get("image")}
    lines = [f"quality vs fp32 torch ({fast['settings']['model']}):"]
    for r in fast["runs"]:
        base = ref_runs.get(r["size"])
        if r["status"] != "ok" or not r.get("image") or base is None:
            continue
        a, b = pixels(r), pixels(base)
        mse = float(((a - b) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        lines.append(f"  {r['backend']:<24} {r['size']:<9} b{r['batch']:<3} PSNR {psnr:6.2f} dB  "
                     f"max diff {int(np.abs(a - b).max()):3d}/255  {'ok' if psnr >= 35 else 'BELOW 35 dB'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
