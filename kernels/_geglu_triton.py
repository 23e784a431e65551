"""Triton kernel behind `kernels.geglu` (imported lazily: Triton is optional)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M = 8
_BLOCK_N = 256


@triton.jit
def _geglu_kernel(x_ptr, b_ptr, y_ptr, M, D, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    # x row r holds [hidden (D) | gate (D)]; 64-bit row offsets because tokens * 2D can pass 2**31 at large batch.
    row_off = rows[:, None].to(tl.int64) * (2 * D)
    h = tl.load(x_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + row_off + D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        cmask = cols < D
        h += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        g += tl.load(b_ptr + D + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # exact GELU, as F.gelu's default (not the tanh approximation)
    gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    y = h * gelu
    tl.store(y_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: contiguous (M, 2*D) -> (M, D)."""
    M, two_d = x.shape
    D = two_d // 2
    y = torch.empty((M, D), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(D, _BLOCK_N))
    _geglu_kernel[grid](
        x, x if bias is None else bias, y, M, D,
        HAS_BIAS=bias is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return y
