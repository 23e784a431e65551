"""When the Triton kernels can run, and the one error they raise when they cannot.

Triton is an optional dependency (the `kernels` extra) and compiles for CUDA only. On a CPU machine the
kernels still run, slowly, under Triton's interpreter -- that is how the tests check them in CI -- but the
interpreter is chosen when `triton` is first imported, so TRITON_INTERPRET=1 must be set before that.
"""

from __future__ import annotations

import importlib.util
import os

import torch


class KernelUnavailable(RuntimeError):
    """A Triton kernel was asked to run where it cannot; the message says what to use instead."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when Triton is installed and can run kernels on `device` (default: CUDA if present, else CPU).

    CUDA devices need a working CUDA build of torch; CPU tensors need TRITON_INTERPRET=1 (tests only).
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    return kind == "cpu" and _interpreting()


def require_triton(*tensors: torch.Tensor, kernel: str) -> None:
    """Raise `KernelUnavailable` unless every tensor sits where Triton can run `kernel`."""
    if importlib.util.find_spec("triton") is None:
        raise KernelUnavailable(
            f"{kernel}: Triton is not installed; pip install 'movielm-fast[kernels]' "
            f"or use the PyTorch path ({kernel}_ref / --attention sdpa)"
        )
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and _interpreting():
            continue
        raise KernelUnavailable(
            f"{kernel}: Triton kernels run on CUDA tensors, got a {t.device.type} tensor. Use the PyTorch path "
            f"({kernel}_ref / --attention sdpa), or for tests set TRITON_INTERPRET=1 before importing triton (slow)"
        )


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
