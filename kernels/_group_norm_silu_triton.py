"""Triton kernels behind `kernels.group_norm_silu` (imported lazily: Triton is optional)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one program touches per loop step; a power of two for tl.arange.
_BLOCK = 1024
# Elements per (sample, group) that one statistics program handles before we split the group over more
# programs: SD's (2, 320, 64, 64) has only 64 groups, too few to fill a GPU one program each.
_TARGET_PER_PROGRAM = 4096


@triton.jit
def _group_offsets(i, n, g, C, HW, Cg, CHANNELS_LAST: tl.constexpr):
    # Flat index i runs over one (sample, group) in memory order, so both layouts read forward.
    if CHANNELS_LAST:
        # memory is (N, HW, C): a group is Cg adjacent channels at every pixel
        pix = i // Cg
        c = g * Cg + i % Cg
        off = n * C * HW + pix * C + c
    else:
        # memory is (N, C, HW): a group is one contiguous run of Cg * HW values
        c = g * Cg + i // HW
        off = n * C * HW + g * Cg * HW + i
    return off, c


@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr, C, HW, Cg, G, group_numel, chunk,
    CHANNELS_LAST: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: partial (count, mean, M2) of one slice of one (sample, group).
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G
    start = s * chunk
    end = tl.minimum(start + chunk, group_numel)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for base in range(start, end, BLOCK):
        i = base + tl.arange(0, BLOCK)
        mask = i < end
        off, c = _group_offsets(i, n, g, C, HW, Cg, CHANNELS_LAST)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        cnt = tl.sum(mask.to(tl.float32), axis=0)
        bmean = tl.sum(x, axis=0) / cnt
        d = tl.where(mask, x - bmean, 0.0)
        bm2 = tl.sum(d * d, axis=0)
        # Chan et al. merge: sum/sum-of-squares in fp32 cancels badly when |mean| >> std.
        total = count + cnt
        delta = bmean - mean
        mean = mean + delta * (cnt / total)
        m2 = m2 + bm2 + delta * delta * (count * cnt / total)
        count = total
    p = part_ptr + (ng * SPLIT + s) * 3
    tl.store(p, count)
    tl.store(p + 1, mean)
    tl.store(p + 2, m2)


@triton.jit
def _gn_silu_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, C, HW, Cg, G, group_numel, chunk, eps,
    CHANNELS_LAST: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng % G

    # Every program re-merges its group's SPLIT partials: cheaper than a third launch.
    k = tl.arange(0, SPLIT)
    p = part_ptr + (ng * SPLIT + k) * 3
    cnts = tl.load(p)
    means = tl.load(p + 1)
    m2s = tl.load(p + 2)
    total = tl.sum(cnts, axis=0)
    mean = tl.sum(cnts * means, axis=0) / total
    dm = means - mean
    var = tl.sum(m2s + cnts * dm * dm, axis=0) / total
    rstd = 1.0 / tl.sqrt(var + eps)

    start = s * chunk
    end = tl.minimum(start + chunk, group_numel)
    for base in range(start, end, BLOCK):
        i = base + tl.arange(0, BLOCK)
        mask = i < end
        off, c = _group_offsets(i, n, g, C, HW, Cg, CHANNELS_LAST)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        y = y * tl.sigmoid(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
           channels_last: bool, split: int | None) -> torch.Tensor:
    """`x` is contiguous in its layout: (N, C, HW) memory, or (N, HW, C) memory when `channels_last`."""
    N, C = x.shape[0], x.shape[1]
    HW = x[0, 0].numel()
    Cg = C // num_groups
    group_numel = Cg * HW
    if split is None:
        split = triton.next_power_of_2(max(1, triton.cdiv(group_numel, _TARGET_PER_PROGRAM)))
        split = min(split, 64)
    # Round slices to whole blocks so only the last slice of a group has a ragged tail.
    chunk = triton.cdiv(triton.cdiv(group_numel, split), _BLOCK) * _BLOCK
    y = torch.empty_like(x)  # keeps x's memory format
    partials = torch.empty((N * num_groups, split, 3), device=x.device, dtype=torch.float32)
    grid = (N * num_groups, split)
    _gn_stats_kernel[grid](
        x, partials, C, HW, Cg, num_groups, group_numel, chunk,
        CHANNELS_LAST=channels_last, SPLIT=split, BLOCK=_BLOCK, num_warps=4,
    )
    _gn_silu_apply_kernel[grid](
        x, y, weight, bias, partials, C, HW, Cg, num_groups, group_numel, chunk, eps,
        CHANNELS_LAST=channels_last, SPLIT=split, BLOCK=_BLOCK, num_warps=4,
    )
    return y
