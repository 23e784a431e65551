"""Fused GroupNorm + SiLU: the UNet's most frequent memory-bound pair (every ResnetBlock2D has two).

Unfused, PyTorch reads the activation twice for statistics and normalization, writes it, then reads and writes
it again for SiLU. The kernel reads it twice and writes once, in NCHW or channels-last, whichever it gets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels._runtime import require_triton


def group_norm_silu_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """The PyTorch path the kernel must match: silu(group_norm(x))."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *, split: int | None = None) -> torch.Tensor:
    """silu(group_norm(x)) in one Triton pass; x is (N, C, *spatial), output has x's memory format.

    Statistics are accumulated in fp32 whatever x's dtype. `split` (a power of two) forces how many programs
    share one group's statistics; leave it None outside tests and tuning.
    """
    require_triton(x, kernel="group_norm_silu")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu expects (N, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C % num_groups:
        raise ValueError(f"group_norm_silu: {C} channels do not split into {num_groups} groups")
    if split is not None and (split < 1 or split & (split - 1)):
        raise ValueError(f"group_norm_silu: split must be a power of two, got {split}")
    from kernels import _group_norm_silu_triton as impl

    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not channels_last:
        x = x.contiguous()
    weight = torch.ones(C, device=x.device, dtype=x.dtype) if weight is None else weight.contiguous()
    bias = torch.zeros(C, device=x.device, dtype=x.dtype) if bias is None else bias.contiguous()
    return impl.launch(x, num_groups, weight, bias, float(eps), channels_last, split)


class FusedGroupNormSiLU(nn.Module):
    """A GroupNorm whose output has already gone through SiLU; holds the original GroupNorm's parameters."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups = norm.num_groups
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


def replace_group_norm_silu(model: nn.Module) -> int:
    """Fuse every `conv_norm_out` GroupNorm + `conv_act` SiLU pair in `model` (UNet, VAE encoder/decoder).

    Those pairs are separate submodules called back to back, so swapping the norm for `FusedGroupNormSiLU`
    and the activation for `nn.Identity` in our own instance changes nothing else. ResnetBlock2D's two pairs
    are not touched: the block applies its `nonlinearity` module to the time embedding too, so fusing them
    would mean rewriting the block's forward. Returns how many pairs were fused.
    """
    fused = 0
    for module in model.modules():
        norm = getattr(module, "conv_norm_out", None)
        act = getattr(module, "conv_act", None)
        if type(norm) is nn.GroupNorm and isinstance(act, nn.SiLU) and norm.affine:
            module.conv_norm_out = FusedGroupNormSiLU(norm)
            module.conv_act = nn.Identity()
            fused += 1
    return fused
