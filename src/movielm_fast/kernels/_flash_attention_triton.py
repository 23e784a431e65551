"""Triton kernel behind `kernels.flash_attention` (imported lazily: Triton is optional)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _flash_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, qk_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N_Q, N_K, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head) against all keys, streamed BLOCK_N at a time with an
    # online softmax, so the (N_Q, N_K) score matrix never exists in memory.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Head dims 40/80/160 are padded to 64/128/256 lanes; the padding loads as zero and adds nothing to q.k.
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < N_Q

    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        kn = start_n + offs_n
        n_ok = kn < N_K
        kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        # scores in log2 units: qk_scale already holds scale * log2(e), so exp2 below is the softmax's exp
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if not EVEN_N:
            # 77 text tokens leave a ragged last block: padded keys must get zero weight, not exp(0)
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old row max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _config(block_d: int, elem_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) that keep q, k and v tiles within an H100/A100's shared memory."""
    wide = elem_size >= 4  # fp32 tiles take twice the room
    if block_d <= 64:
        return (64, 64, 4) if wide else (128, 64, 4)
    if block_d <= 128:
        return (64, 32, 4) if wide else (128, 64, 8)
    return (32, 32, 4) if wide else (64, 32, 8)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    # Written as (B, N, H, d) and returned as a (B, H, N, d) view, so the caller's
    # transpose(1, 2).reshape(B, N, H * d) back to tokens is free.
    out = torch.empty((B, N_Q, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, H, N, d)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs every side >= 16
    block_m, block_n, warps = _config(block_d, q.element_size())
    grid = (triton.cdiv(N_Q, block_m), B * H)
    _flash_fwd_kernel[grid](
        q, k, v, out, scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N_Q, N_K, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_N=N_K % block_n == 0,
        # fp32 inputs stay exact fp32 (tf32 would cost ~1e-3); the setting only matters for fp32 x fp32 dots
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=2,
    )
    return out
