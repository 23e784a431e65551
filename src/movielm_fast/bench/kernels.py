"""Time each Triton kernel against the PyTorch path it would replace, at SD 1.5 512x512 shapes (batch 2 = CFG).

    python bench/kernels.py [--dtype fp16|bf16] [--reps 50] [--only attention] [--out bench/results]

CUDA only. Each case: warm-up, then `--reps` launches timed one by one with CUDA events, L2 flushed before each,
median reported. Attention is reported as TFLOP/s against a measured fp16/bf16 matmul. A kernel slower than its
PyTorch path must stay off by default (issue 7): the table's `speedup` column is that decision. Results go to bench/results/kernels-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from movielm_fast.kernels import triton_available
from movielm_fast.kernels.flash_attention import flash_attention, flash_attention_ref

from .hardware import RESULTS

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
    """The hardware limit the kernels are reported against: matmul throughput."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    mm_ms = time_cuda(lambda: a @ b, reps)
    return {"matmul_tflops": 2 * n**3 / mm_ms / 1e9}


def _row(kind: str, case: str, ms_torch: float, ms_triton: float, max_diff: float, **extra) -> dict:
    return {"kernel": kind, "case": case, "torch_ms": ms_torch, "triton_ms": ms_triton,
            "speedup": ms_torch / ms_triton, "max_abs_diff": max_diff, **extra}


def bench_attention(dtype, reps, ceil) -> list[dict]:
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


BENCHES = {"attention": bench_attention}


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':<15} {'case':<36} {'torch ms':>9} {'triton ms':>9} {'speedup':>8} {'vs limit':>8} {'max diff':>9}")
    for r in rows:
        limit_s = f"{100 * r['matmul_fraction']:7.1f}%"
        print(f"{r['kernel']:<15} {r['case']:<36} {r['torch_ms']:9.4f} {r['triton_ms']:9.4f} "
              f"{r['speedup']:7.2f}x {limit_s} {r['max_abs_diff']:9.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma list of: " + ", ".join(BENCHES))
    parser.add_argument("--out", type=Path, default=RESULTS)
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
    if not triton_available("cuda"):
        print("bench/kernels.py needs Triton: pip install triton (the project's 'kernels' extra).", file=sys.stderr)
        return 2

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    ceil = measure_ceilings(dtype, args.reps)
    print(f"{torch.cuda.get_device_name()}: "
          f"{args.dtype} matmul {ceil['matmul_tflops']:.0f} TFLOP/s")
    rows = []
    for name in only:
        rows += BENCHES[name](dtype, args.reps, ceil)
    print_table(rows)

    import triton  # optional dependency: present here (checked above)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{stamp}.json"
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "dtype": args.dtype, "reps": args.reps, "batch": BATCH, "ceilings": ceil, "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
