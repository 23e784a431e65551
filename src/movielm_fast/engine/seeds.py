"""Per-frame seeds and initial latents.

A frame's initial latents are exactly what diffusers draws for ``generator=torch.Generator("cpu").manual_seed(seed)``
at batch size 1, so a frame renders the same in any batch, in any order, on any backend, and can be reproduced in
plain diffusers.

A frame without a seed of its own gets one derived from the movie seed by a versioned scheme (manifests record
the scheme they were rendered with, so a movie keeps its noise when it resumes):

1. sha256("{movie seed}:{frame id}"), 63 bits. Two movies with the same movie seed got the same noise frame by
   frame, and seeds above 2^53 are rounded by JavaScript tools (A1111's web UI, ComfyUI, Civitai).
2. sha256 of the JSON list [2, movie seed, movie id, frame id], 53 bits: the movie's id is part of every frame's
   seed (ids are unique within an output folder), and every seed is a JavaScript-safe integer.
"""

from __future__ import annotations

import hashlib
import json

import torch

SEED_SCHEMES = (1, 2)
SEED_SCHEME = SEED_SCHEMES[-1]  # what new renders use
SAFE_SEEDS = 2**53  # seeds below this survive JavaScript's numbers exactly


def derived_seed(scheme: int, movie_seed: int, movie_id: str, *what: str) -> int:
    """A seed derived from the movie seed for `what` (a frame id; "anchor" and a character name), stable across
    runs, machines and Python versions (unlike hash())."""
    if scheme == 1:
        text, bits = ":".join([str(movie_seed), *what]), 63
    elif scheme == 2:
        text, bits = json.dumps([2, movie_seed, movie_id, *what]), 53
    else:
        raise ValueError(f"unknown seed scheme {scheme!r}: this version knows {SEED_SCHEMES}")
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**bits - 1)


def frame_seed(movie_seed: int, movie_id: str, frame_id: str, explicit: int | None, mode: str,
               scheme: int = SEED_SCHEME) -> int:
    """A frame's seed: its own, the movie seed itself (mode "shared"), or derived from both ("per_frame")."""
    if explicit is not None:
        return explicit
    if mode == "shared":
        return movie_seed
    return derived_seed(scheme, movie_seed, movie_id, frame_id)


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(B, C, h, w) float32 CPU latents, one generator per frame; the generators continue to feed ancestral
    schedulers' noise, as diffusers does with its one generator."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return latents, generators
