"""Flash-attention forward for the head dims Stable Diffusion uses (40, 64, 80, 160; anything up to 256).

Self-attention over latent pixels (4096 tokens at 512 px) and cross-attention to 77 text tokens. No mask, no
dropout, no backward: this is the inference path. Anything else goes to `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch

from ._runtime import require_triton

MAX_HEAD_DIM = 256


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v computed in fp32, returned in q's dtype; q (B, heads, N, d), k/v (B, heads, M, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, heads, N, M)
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def flash_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `flash_attention` handles these inputs (shape and dtype only, not the device)."""
    return (
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4
        and q.shape[-1] <= MAX_HEAD_DIM
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.dtype == k.dtype == v.dtype
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[2] == v.shape[2] > 0
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
    )


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Triton twin of `flash_attention_ref`. Inputs may be strided views (e.g. transposed projections).

    Softmax statistics and the accumulator are fp32; fp16/bf16 inputs go through tensor-core dots.
    The result is a (B, heads, N, d) view of a (B, N, heads, d) buffer: `.transpose(1, 2)` is contiguous.
    """
    require_triton(q, k, v, kernel="flash_attention")
    if not flash_attention_supported(q, k, v):
        raise ValueError(
            "flash_attention expects q (B, heads, N, d), k and v (B, heads, M, d) of one float dtype with "
            f"d <= {MAX_HEAD_DIM} and M > 0; got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, "
            f"v {tuple(v.shape)} {v.dtype}"
        )
    from . import _flash_attention_triton as impl  # imports triton, an optional dependency: only when used

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return impl.launch(q, k, v, scale)
