"""Full-reference image metrics for comparing a lossy render with the exact one (same prompt, same seed)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8(images) -> np.ndarray:
    """Images as uint8: uint8 ones as they are, floats in [0, 1] scaled (NaN as 0, out of range clipped)."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return (np.nan_to_num(arr.astype(np.float32)) * 255).round().clip(0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (or stacks of them), in dB; inf when identical."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, per
    channel, valid positions only) of two (H, W, 3) or (N, H, W, 3) uint8 images; 1.0 when identical."""
    x, y = (torch.from_numpy(np.asarray(v, np.float64).reshape(-1, *np.shape(v)[-3:])).permute(0, 3, 1, 2)
            for v in (a, b))  # (N, C, H, W)
    channels = x.shape[1]
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())
