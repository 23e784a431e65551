"""The benchmark protocol on a GPU machine, in one call:

    python -m movielm_fast.bench.gpu            # sd15-arch 512² batch 1,8,16 and sdxl-arch 1024² batch 1,4,8, fp16,
                                                # 20 steps: ours (default path) beside diffusers and diffusers+compile
    python -m movielm_fast.bench.gpu --knobs    # and each lossless knob on its own; writes the CUDA knob table
    python -m movielm_fast.bench.gpu --quick    # 3 steps, 2 repeats, batch 1,2, sd15-arch: a smoke run
    python -m movielm_fast.bench.gpu --model flux-arch --dtype bf16 --steps 28 --peer-compile off
                                     --no-fp32-reference   # a DiT row (klein-arch likewise): transformer it/s, MFU
    python -m movielm_fast.bench.gpu --goals [--render-json render.log]   # the issue's goals table from the
                                                # latest results (and a second render process's --json output)

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

from .args import bench_parser
from .report import load_results, short_table, write_results_md
from .runner import BenchSettings, run_bench

# Each lossless knob of the torch backend on its own, against the default (`torch`: fp16, SDPA, channels-last, fused
# QKV, CUDA graphs as measured); `--knobs` times them and writes the winners into engine/cuda_knobs.json.
KNOB_VARIANTS = ("torch+no-cuda_graphs", "torch+cudnn_benchmark", "torch+sdpa_backend=flash",
                 "torch+sdpa_backend=cudnn", "torch+sdpa_backend=efficient", "torch+no-fuse_qkv",
                 "torch+no-channels_last", "torch+no-cuda_graphs+compile_unet")
# (model, native size, batch sizes): enough to find the best batch on 80-141 GB cards; a batch that does not fit is
# recorded as out of memory and stops the larger ones.
MODELS = {"sd15-arch": (512, [1, 8, 16]), "sdxl-arch": (1024, [1, 4, 8])}
# Issue 24's goals on an H100/H200, fp16, 20 steps, lossless (>= 40 dB PSNR against our fp32 image): UNet it/s of the
# default path at batch 1; at the best batch, images/s and either the ratio to diffusers+compile or the UNet's MFU.
GOALS = {"sd15-arch": {"b1_its": 130.0, "img_s": 11.0, "vs_compile": 1.3},
         "sdxl-arch": {"b1_its": 28.0, "img_s": 1.6, "mfu_unet": 0.57}}
LOSSLESS_DB = 40.0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    ap = bench_parser("gpu", __doc__, steps=20, repeats=3, results="--out")
    ap.add_argument("--model", action="append", help="benchmark only this model (repeatable): sd15-arch, sdxl-arch, "
                    "flux-arch, klein-arch, demo or a local folder (default: sd15-arch and sdxl-arch)")
    ap.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32 (default fp16)")
    ap.add_argument("--backend", default="torch", help="comma-separated backends or variants such as "
                    "torch+no-cuda_graphs (default: torch, the default fast path)")
    ap.add_argument("--knobs", action="store_true", help="also time each knob of KNOB_VARIANTS on its own and write "
                    "the winners into the CUDA knob table (engine/cuda_knobs.json)")
    ap.add_argument("--peer-compile", default="max-autotune", choices=["max-autotune", "default", "off"],
                    help="diffusers' speed recipe, compiled in this torch.compile mode (default: max-autotune, the "
                         "recipe's; its compile time is reported apart); off: not timed")
    ap.add_argument("--batch-sizes", type=_ints, help="e.g. 1,2,4,8 (default per model)")
    ap.add_argument("--no-fp32-reference", action="store_true", help="skip the fp32 render the PSNR columns compare "
                    "with (flux-arch in fp32 would need twice the memory and several times the time of its bf16 row)")
    ap.add_argument("--quick", action="store_true", help="3 steps, 2 repeats, batch 1,2, sd15-arch: a smoke run")
    ap.add_argument("--goals", action="store_true", help="only print the goals table from the latest GPU results "
                    "in --out (no benchmark run)")
    ap.add_argument("--render-json", type=Path, help="with --goals: the output of `render --json` of a second "
                    "process on the same model (its first-batch cost is the last row)")
    return ap


def settings_for(args: argparse.Namespace, model: str) -> BenchSettings:
    """What one --model of a parsed command line benchmarks (bench/gpu-check.sh's steps are tested through this on
    the CPU)."""
    size, batches = MODELS.get(model, (None, [1, 2, 4, 8]))
    return BenchSettings(
        model=model, backends=args.backend.split(",") + (list(KNOB_VARIANTS) if args.knobs else []), device="cuda",
        dtype=args.dtype, sizes=[(size, size)] if size else None,
        batch_sizes=[1, 2] if args.quick else (args.batch_sizes or batches), steps=3 if args.quick else args.steps,
        repeats=2 if args.quick else args.repeats, out=args.out,
        peer_compile=None if args.peer_compile == "off" else args.peer_compile)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.goals:
        print(goals_table(merged_fp16_results(args.out),
                          _render_record(args.render_json) if args.render_json else None))
        return 0

    if not torch.cuda.is_available():
        print(f"bench.gpu needs a CUDA GPU and a CUDA build of torch; this machine has none (torch "
              f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}).\n"
              f"  fix: run it on a GPU machine, or benchmark the CPU with `movielm-fast bench --device cpu`",
              file=sys.stderr)
        return 2

    names = args.model or (["sd15-arch"] if args.quick else list(MODELS))
    results, references = [], []
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for model in names:
        settings = settings_for(args, model)
        try:
            run = run_bench(settings, log=log)
            results.append(run.result)
            if args.dtype != "fp32" and not args.no_fp32_reference:
                # The quality bar of the fast path: the same frame in fp32 with the plain torch backend.
                ref = BenchSettings(model=model, backends=["torch"], device="cuda", dtype="fp32",
                                    sizes=settings.sizes, batch_sizes=[1], steps=settings.steps, repeats=1,
                                    out=args.out, baseline=False)
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
    print(goals_table(results))
    return 0


def merged_fp16_results(results_dir: Path) -> list[dict]:
    """One result per model: the rows of every fp16 CUDA run in the folder (newest settings), so that runs made in
    separate steps (bench/gpu-check.sh times the compile peer apart, last) make one goals table. Each bench.gpu run
    also saves an fp32 reference run, which is left out."""
    merged: dict[str, dict] = {}
    for _, d in load_results(results_dir):
        if d["machine"].get("device") == "cuda" and d["settings"].get("dtype") == "fp16":
            m = merged.setdefault(d["settings"]["model"], {**d, "runs": []})
            m["settings"] = d["settings"]
            m["runs"] = m["runs"] + d["runs"]
    return list(merged.values())


def _render_record(path: Path) -> dict | None:
    """The last JSON line with a "startup" key in a `render --json` log (None if there is none)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "startup" in d:
            return d
    return None


def _lossless(r: dict) -> str:
    psnr = r.get("psnr_vs_fp32_torch")
    if psnr is None:
        return "PSNR not measured"
    return f"PSNR {psnr:.1f} dB" + ("" if psnr >= LOSSLESS_DB else " (LOSSY: under 40 dB)")


def goals_table(results: list[dict], second: dict | None = None) -> str:
    """The issue's goals, one line each, from bench.gpu results (ours: the default `torch` rows) and, for the last
    row, a second `render --json` process on the same model: its first batch (capture or compile included)."""
    lines = ["goals (issue 24; fp16, 20 steps, lossless = PSNR >= 40 dB against our fp32 image):"]
    for res in results:
        model, st = res["settings"]["model"], res["settings"]
        goal = GOALS.get(model)
        if goal is None:
            continue
        off = "" if st.get("steps") == 20 and st.get("dtype") == "fp16" else \
            f" [measured at {st.get('steps')} steps, {st.get('dtype')}: not the goal's setting]"
        ours = [r for r in res["runs"] if r["backend"] == "torch" and r["status"] == "ok"]
        b1 = next((r for r in ours if r["batch"] == 1), None)
        if b1 is None or b1.get("unet_steps_per_s") is None:
            lines.append(f"  {model} batch 1: not measured{off}")
        else:
            its = b1["unet_steps_per_s"]
            lines.append(f"  {model} batch 1: {its:.1f} UNet it/s by default (goal >= {goal['b1_its']:g}: "
                         f"{'met' if its >= goal['b1_its'] else 'not met'}), {_lossless(b1)}{off}")
        best = max(ours, key=lambda r: r["images_per_s"], default=None)
        if best is None:
            lines.append(f"  {model} best batch: not measured{off}")
            continue
        img_s = best["images_per_s"]
        parts = [f"{img_s:.2f} img/s at batch {best['batch']} (goal >= {goal['img_s']:g})"]
        met = img_s >= goal["img_s"]
        if "vs_compile" in goal:
            # The peer may have been timed in another run of the same batch: its ratio is on that run's row.
            ratio = next((r["speedup_vs_diffusers_compile"] for r in [best] + ours if r["batch"] == best["batch"]
                          and r.get("speedup_vs_diffusers_compile") is not None), None)
            parts.append(f"{ratio:.2f}x diffusers+compile (goal >= {goal['vs_compile']:g})" if ratio is not None
                         else "diffusers+compile not measured")
            met = met and ratio is not None and ratio >= goal["vs_compile"]
        if "mfu_unet" in goal:
            mfu = best.get("mfu", {}).get("unet_step")
            parts.append(f"UNet MFU {mfu:.0%} (goal >= {goal['mfu_unet']:.0%})" if mfu is not None
                         else "UNet MFU not measured")
            met = met and mfu is not None and mfu >= goal["mfu_unet"]
        lines.append(f"  {model} best batch: {', '.join(parts)}: {'met' if met else 'not met'}, {_lossless(best)}{off}")
    if second is None:
        lines.append("  second process, same model: not measured (bench/gpu-check.sh renders twice and passes the "
                     "second's --json output with --render-json)")
    else:
        phases = second["startup"].get("phases", {})
        first, ttfi = phases.get("first_batch"), second["startup"].get("time_to_first_image")
        warm = next((r["stages"]["batch"]["median"] for res in results if res["settings"]["model"] == "sd15-arch"
                     for r in res["runs"] if r["backend"] == "torch" and r["status"] == "ok" and r["batch"] == 1), None)
        extra = f" (a warm sd15-arch batch-1 frame: {warm:.3f} s; the rest is capture, compile or cache loading)" \
            if warm is not None and first is not None else ""
        lines.append(f"  second process, same model: first batch {first if first is not None else '?'} s{extra}, "
                     f"time to first image {ttfi if ttfi is not None else '?'} s, "
                     f"model load {phases.get('model_load', '?')} s")
    return "\n".join(lines)


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
