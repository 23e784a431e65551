"""Time each Triton kernel against the PyTorch path it would replace, at SD 1.5 512x512 shapes (batch 2 = CFG).

    python bench/kernels.py [--dtype fp16|bf16] [--reps 50] [--only groupnorm,geglu,attention] [--out bench/results]

CUDA only. Each case: warm-up, then `--reps` launches timed one by one with CUDA events, L2 flushed before each,
median reported. Memory-bound kernels are reported as GB/s against a measured device-to-device copy; attention
as TFLOP/s against a measured fp16/bf16 matmul. A kernel slower than its PyTorch path must stay off by default
(issue 7): the table's `speedup` column is that decision. Results go to bench/results/kernels-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Running `python bench/kernels.py` puts bench/ first on sys.path, where this file would shadow the package.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GROUP_NORM_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
# SD 1.5 transformer blocks per level: (tokens, model dim); the feed-forward is GEGLU(dim -> 2 * 4 * dim).
FFN_LEVELS = [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]
# (heads, queries, head dim, keys or None for self-attention). SD 1.5 uses 8 heads of 40/80/160;
# SD 2.x / SDXL use 64-wide heads.
ATTENTION_CASES = [
    (8, 4096, 40, None), (8, 4096, 40, 77),
    (8, 1024, 80, None), (8, 1024, 80, 77),
    (8, 256, 160, None), (8, 256, 160, 77),
    (10, 4096, 64, None), (10, 4096, 64, 77),
]
BATCH = 2


def time_cuda(fn, reps: int, warmup: int = 10) -> float:
    """Median milliseconds of `fn()`, each rep on a cold L2 (the UNet never finds its activations cached)."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(dtype: torch.dtype, reps: int) -> dict:
    """The hardware limits the kernels are reported against: copy bandwidth and matmul throughput."""
    src = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_cuda(lambda: dst.copy_(src), reps)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    mm_ms = time_cuda(lambda: a @ b, reps)
    return {"copy_gbps": 2 * src.numel() / copy_ms / 1e6, "matmul_tflops": 2 * n**3 / mm_ms / 1e9}


def _row(kind: str, case: str, ms_torch: float, ms_triton: float, max_diff: float, **extra) -> dict:
    return {"kernel": kind, "case": case, "torch_ms": ms_torch, "triton_ms": ms_triton,
            "speedup": ms_torch / ms_triton, "max_abs_diff": max_diff, **extra}


def bench_group_norm(dtype, reps, ceil) -> list[dict]:
    from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref

    rows = []
    for shape in GROUP_NORM_SHAPES:
        for layout in ("nchw", "nhwc"):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            if layout == "nhwc":
                x = x.to(memory_format=torch.channels_last)
            w = torch.randn(shape[1], device="cuda", dtype=dtype)
            b = torch.randn(shape[1], device="cuda", dtype=dtype)
            t_ref = time_cuda(lambda: group_norm_silu_ref(x, 32, w, b), reps)
            t_tri = time_cuda(lambda: group_norm_silu(x, 32, w, b), reps)
            diff = (group_norm_silu(x, 32, w, b).float() - group_norm_silu_ref(x, 32, w, b).float()).abs().max()
            moved = 3 * x.numel() * x.element_size()  # the fused minimum: read twice, write once
            gbps = moved / t_tri / 1e6
            rows.append(_row("groupnorm_silu", f"{tuple(shape)} {layout}", t_ref, t_tri, diff.item(),
                             triton_gbps=gbps, bandwidth_fraction=gbps / ceil["copy_gbps"]))
    return rows


def bench_geglu(dtype, reps, ceil) -> list[dict]:
    from diffusers.models.activations import GEGLU

    from kernels.geglu import FusedGEGLU, geglu, geglu_ref

    rows = []
    for tokens, dim in FFN_LEVELS:
        inner = 4 * dim
        # activation alone: diffusers' bias lives in the GEMM, so its activation sees an already-biased input
        x_proj = torch.randn(BATCH, tokens, 2 * inner, device="cuda", dtype=dtype)
        bias = torch.randn(2 * inner, device="cuda", dtype=dtype)
        biased = x_proj + bias
        t_ref = time_cuda(lambda: geglu_ref(biased), reps)
        t_tri = time_cuda(lambda: geglu(x_proj, bias), reps)
        diff = (geglu(x_proj, bias).float() - geglu_ref(biased).float()).abs().max().item()
        moved = 1.5 * x_proj.numel() * x_proj.element_size()
        gbps = moved / t_tri / 1e6
        rows.append(_row("geglu", f"act ({BATCH},{tokens},{2 * inner})", t_ref, t_tri, diff,
                         triton_gbps=gbps, bandwidth_fraction=gbps / ceil["copy_gbps"]))
        # what the UNet actually runs: projection + activation, module against module
        module = GEGLU(dim, inner).to("cuda", dtype).eval()
        fused = FusedGEGLU(module.proj)
        x = torch.randn(BATCH, tokens, dim, device="cuda", dtype=dtype)
        with torch.no_grad():
            t_ref = time_cuda(lambda: module(x), reps)
            t_tri = time_cuda(lambda: fused(x), reps)
            diff = (fused(x).float() - module(x).float()).abs().max().item()
        rows.append(_row("geglu", f"proj+act ({BATCH},{tokens},{dim})->{inner}", t_ref, t_tri, diff))
    return rows


def bench_attention(dtype, reps, ceil) -> list[dict]:
    from kernels.flash_attention import flash_attention, flash_attention_ref

    rows = []
    for heads, queries, d, keys in ATTENTION_CASES:
        n_k = queries if keys is None else keys
        q = torch.randn(BATCH, heads, queries, d, device="cuda", dtype=dtype)
        k = torch.randn(BATCH, heads, n_k, d, device="cuda", dtype=dtype)
        v = torch.randn(BATCH, heads, n_k, d, device="cuda", dtype=dtype)
        t_ref = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        t_tri = time_cuda(lambda: flash_attention(q, k, v), reps)
        diff = (flash_attention(q, k, v).float() - flash_attention_ref(q, k, v).float()).abs().max().item()
        flops = 4 * BATCH * heads * queries * n_k * d
        tflops = flops / t_tri / 1e9
        kind = "self" if keys is None else f"cross{keys}"
        rows.append(_row("attention", f"({BATCH},{heads},{queries},{d}) {kind}", t_ref, t_tri, diff,
                         torch_path="F.scaled_dot_product_attention", triton_tflops=tflops,
                         matmul_fraction=tflops / ceil["matmul_tflops"]))
    return rows


BENCHES = {"groupnorm": bench_group_norm, "geglu": bench_geglu, "attention": bench_attention}


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':<15} {'case':<36} {'torch ms':>9} {'triton ms':>9} {'speedup':>8} {'vs limit':>8} {'max diff':>9}")
    for r in rows:
        limit = r.get("bandwidth_fraction", r.get("matmul_fraction"))
        limit_s = f"{100 * limit:7.1f}%" if limit is not None else f"{'-':>8}"
        print(f"{r['kernel']:<15} {r['case']:<36} {r['torch_ms']:9.4f} {r['triton_ms']:9.4f} "
              f"{r['speedup']:7.2f}x {limit_s} {r['max_abs_diff']:9.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma list of: " + ", ".join(BENCHES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU: the Triton kernels compile for CUDA only and these timings "
              "mean nothing elsewhere. Kernel correctness on CPU is covered by "
              "`TRITON_INTERPRET=1 pytest tests/test_kernels.py`.", file=sys.stderr)
        return 2
    from kernels import triton_available

    if not triton_available("cuda"):
        print("bench/kernels.py needs Triton: pip install triton (the project's 'kernels' extra).", file=sys.stderr)
        return 2

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    ceil = measure_ceilings(dtype, args.reps)
    print(f"{torch.cuda.get_device_name()}: copy {ceil['copy_gbps']:.0f} GB/s, "
          f"{args.dtype} matmul {ceil['matmul_tflops']:.0f} TFLOP/s")
    rows = []
    for name in only:
        rows += BENCHES[name](dtype, args.reps, ceil)
    print_table(rows)

    import triton

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{stamp}.json"
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "dtype": args.dtype, "reps": args.reps, "batch": BATCH, "ceilings": ceil, "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
