"""Fused GEGLU: the activation of every transformer feed-forward in the SD UNet.

diffusers' GEGLU projects x to 2*D features (bias included), splits them into hidden and gate halves and
returns hidden * gelu(gate): four passes over the (tokens, 2*D) projection. The kernel takes the projection
*without* its bias and does bias + split + exact (erf) GELU + product in one read and one write, so the matmul
before it runs as a plain bias-free GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels._runtime import require_triton


def geglu_ref(x_proj: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2*D) -> (..., D): hidden * gelu(gate), as diffusers' GEGLU computes it."""
    if bias is not None:
        x_proj = x_proj + bias
    hidden, gate = x_proj.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def geglu(x_proj: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `geglu_ref`: x_proj is (..., 2*D) before the bias, bias is (2*D,) or None.

    Arithmetic is in fp32; the result has x_proj's dtype.
    """
    require_triton(x_proj, kernel="geglu")
    two_d = x_proj.shape[-1]
    if two_d % 2:
        raise ValueError(f"geglu: last dimension must be even (hidden and gate halves), got {two_d}")
    if bias is not None and bias.shape != (two_d,):
        raise ValueError(f"geglu: bias must have shape ({two_d},), got {tuple(bias.shape)}")
    from kernels import _geglu_triton as impl

    lead = x_proj.shape[:-1]
    x2 = x_proj.reshape(-1, two_d).contiguous()  # (tokens, 2*D)
    out = impl.launch(x2, None if bias is None else bias.contiguous())  # (tokens, D)
    return out.view(*lead, two_d // 2)


class FusedGEGLU(nn.Module):
    """Drop-in for diffusers' GEGLU that keeps its `proj` Linear and runs the fused kernel after it."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The bias is left out of the GEMM so the kernel adds it while it reads the projection anyway.
        return geglu(F.linear(hidden_states, self.proj.weight), self.proj.bias)


def replace_geglu(model: nn.Module) -> int:
    """Swap every diffusers GEGLU submodule of `model` for a `FusedGEGLU` sharing its weights.

    Module replacement in our own model instance; diffusers' classes and functions are left untouched.
    Returns how many modules were replaced.
    """
    from diffusers.models.activations import GEGLU

    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is GEGLU:
                setattr(parent, name, FusedGEGLU(child.proj))
                replaced += 1
    return replaced
