"""Per-frame seeds and initial latents.

A frame's initial latents are exactly what diffusers draws for ``generator=torch.Generator("cpu").manual_seed(seed)``
at batch size 1, so a frame renders the same in any batch, in any order, on any backend, and can be reproduced in
plain diffusers.
"""

from __future__ import annotations

import hashlib

import torch


def frame_seed(movie_seed: int, frame_id: str, explicit: int | None, mode: str) -> int:
    if explicit is not None:
        return explicit
    if mode == "shared":
        return movie_seed
    # Stable across runs, machines and Python versions (unlike hash()).
    digest = hashlib.sha256(f"{movie_seed}:{frame_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, h, w) float32 CPU latents, one generator per frame; the generators continue to feed ancestral
    schedulers' noise, as diffusers does with its one generator."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return latents, generators
