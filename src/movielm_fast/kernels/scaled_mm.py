"""Row-wise scaled FP8 (e4m3) matmul: the GEMM behind `--quantize fp8`, and its plain-PyTorch twin.

`fp8_matmul` runs on FP8 tensor cores through `torch._scaled_mm`; `fp8_matmul_ref` rounds at exactly the same
points and multiplies in fp32, on any device: it is both the `fp8-emulated` path (quality measured without an FP8
GPU) and the reference the fast path is tested against. Which layers use them, and why, is engine/fp8.py's business.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
OUT_DTYPE = torch.bfloat16
"""torch._scaled_mm's row-wise scaling has long returned only bf16 on CUDA (fp16 and fp32 outputs came later, and
depend on the kernel torch picks), so the fast path asks for bf16 and the twin rounds its sums to bf16 too."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (e4m3 values (M, K), fp32 scales (M, 1)), one scale per row: x ~= values * scales. The scales are
    computed on the device (amax / 448): no host sync, so callers stay CUDA-graph capturable."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_matmul_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """`fp8_matmul`'s twin: (M, K) activations x (N, K) e4m3 weights with (1, N) scales -> (M, N) in OUT_DTYPE.
    Same rounding at every point -- activations to e4m3 with the same per-row scales, the same e4m3 weights and
    scales, products summed in fp32, the sum rounded to bf16 -- so only the order of the fp32 sums differs from the
    GPU's. (The CPU build's torch._scaled_mm computes exactly this.)"""
    xq, x_scale = quantize_rows(x)
    return ((xq.float() * x_scale) @ (w.float() * w_scale.t()).t()).to(OUT_DTYPE)


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """FP8 tensor cores: row-wise scaled e4m3 GEMM through torch._scaled_mm, which wants the activations row-major
    (a 1x1 convolution's NCHW input at batch 1 gives a column-major (H*W, C) view) and the weight column-major
    (w.t() of the row-major (N, K) copy). The scales stay on the device: no host sync, CUDA-graph capturable."""
    xq, x_scale = quantize_rows(x)
    return torch._scaled_mm(xq.contiguous(), w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=OUT_DTYPE)
