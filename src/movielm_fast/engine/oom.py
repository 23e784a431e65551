"""Out-of-memory: how to recognise it and the one policy for it (halve the work, retry, never below one).

Every place that sizes work by memory -- the render queue (run.driver), style scenes, VAE encoding and training
micro-batches (style), benchmarks -- uses these two functions instead of its own loop.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import torch

log = logging.getLogger("movielm_fast")

T = TypeVar("T")
R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the allocator failures torch raises as plain
    RuntimeErrors (CPU, MPS)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def smaller(size: int) -> int:
    """The next size to try after `size` ran out of memory; frees cached device memory first."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return max(1, size // 2)


def map_halving(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], size: int, what: str) -> list[R]:
    """fn over consecutive chunks of `items` (at most `size` each), halving the chunk on out-of-memory.
    Re-raises at chunk size 1 or for any other error."""
    out: list[R] = []
    while len(out) < len(items):
        chunk = items[len(out):len(out) + size]
        try:
            results = fn(chunk)
        except Exception as exc:
            if not is_oom(exc) or size == 1:
                raise
            size = smaller(size)
            log.warning("out of memory %s; chunks of %d from now on", what, size)
            continue
        out += results
    return out
