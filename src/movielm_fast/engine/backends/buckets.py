"""Shape buckets of a captured (CUDA graphs) or compiled UNet step: no new capture or compile within a render.

Each new input shape of such a step costs a capture (CUDA graphs: warm-up runs, a capture, graph memory) or a
compile (torch.compile / inductor: seconds to minutes) of its own. Within a render the shapes that change are the
batch rows -- the last batch of a movie, or of a settings group, is usually short -- so a batch is padded up to
the smallest bucket already made for the same image size, prompt windows and dtype, and the padded rows are
dropped from the result. UNet rows are independent (no batch statistics), so the real rows compute the same
function; only the summation order of batched kernels may differ, as between any two batch sizes. LoRA sets do not
enter the key: they are merged into the weights in place.
"""

from __future__ import annotations

from typing import Iterable

import torch

from movielm_fast.export.specs import TOKENS

Bucket = tuple[int, int, int, int, torch.dtype]
"""(rows, latent height, latent width, prompt windows, dtype) of one UNet call; rows include CFG's doubling."""


def unet_bucket(latents: torch.Tensor, hidden: torch.Tensor) -> Bucket:
    """The bucket of a UNet call with `latents` (rows, C, h, w) and text states `hidden` (rows, 77 * windows, D);
    of a transformer call with packed `latents` (rows, image tokens, C): (rows, image tokens, 1, text tokens)."""
    if latents.dim() == 3:
        rows, tokens, _ = latents.shape
        return rows, tokens, 1, hidden.shape[1], latents.dtype
    rows, _, h, w = latents.shape
    return rows, h, w, hidden.shape[1] // TOKENS, latents.dtype


def padded_bucket(key: Bucket, made: Iterable[Bucket]) -> Bucket:
    """The smallest bucket of `made` that serves `key` by padding rows (same size, windows and dtype, at least as
    many rows); `key` itself when there is none (it becomes a new bucket)."""
    return min((b for b in made if b[1:] == key[1:] and b[0] >= key[0]), default=key)


def pad_rows(args: tuple[torch.Tensor | None, ...], rows: int) -> tuple[torch.Tensor | None, ...]:
    """Each batched tensor of `args` grown to `rows` rows by repeating its last row (real values: nothing odd for
    the padded rows to compute); None and 0-d tensors (the timestep) as they are."""
    def pad(a):
        if a is None or a.dim() == 0 or a.shape[0] >= rows:
            return a
        return torch.cat([a, a[-1:].expand(rows - a.shape[0], *a.shape[1:])])

    return tuple(pad(a) for a in args)
