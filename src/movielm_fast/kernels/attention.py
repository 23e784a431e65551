"""Which attention kernels run: the processor `--attention sdpa|xformers` installs, and the SDPA backend
`--sdpa-backend` pins for the UNet's calls.

Everything is installed through diffusers' own `set_attn_processor` and PyTorch's `sdpa_kernel` context; no
library code is patched. The names are importable without torch or diffusers (the CLI builds its choices from
them); the libraries load when a choice is applied.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, ContextManager

if TYPE_CHECKING:
    from torch import nn

ATTENTION_CHOICES = ("sdpa", "xformers")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
"""`--sdpa-backend` values besides "auto" (PyTorch picks per call): the kernel every SDPA call of the UNet uses.
All are exact attention (lossless up to rounding); which is fastest depends on the GPU, head size and token count,
so `bench.gpu` times each (``torch+sdpa_backend=flash``)."""
_SDP_BACKEND_NAMES = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                      "math": "MATH"}  # ours -> torch.nn.attention.SDPBackend's


class AttentionChoiceError(ValueError):
    """`--attention NAME` cannot run here (unknown name, or its library or GPU is missing). `hint` says what to use
    instead; the engine shows both to the user (kernels know nothing of the engine's error types)."""

    def __init__(self, message: str, hint: str):
        super().__init__(f"{message} ({hint})")
        self.message = message
        self.hint = hint


def attention_processor(name: str):
    """A fresh processor for `--attention NAME`; AttentionChoiceError if NAME cannot run here."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
    from diffusers.utils import is_xformers_available

    if name == "sdpa":
        return AttnProcessor2_0()
    if name == "xformers":
        if not is_xformers_available():
            raise AttentionChoiceError("xformers is not installed", "pip install xformers, or use --attention sdpa")
        return XFormersAttnProcessor()
    raise AttentionChoiceError(f"unknown attention implementation {name!r}",
                               f"use one of: {', '.join(ATTENTION_CHOICES)}")


def install_attention(module: nn.Module, name: str) -> None:
    """Give every attention layer of a diffusers UNet or VAE the `name` processor (diffusers' own API)."""
    module.set_attn_processor(attention_processor(name))


def sdpa_context(name: str) -> Callable[[], ContextManager]:
    """A factory of the context in which to run the UNet so that its SDPA calls use backend `name` ("auto": no
    constraint). A pinned backend that cannot serve a call (e.g. flash on fp32 tensors) makes that call fail, which
    is the point of pinning it in a measurement; the default stays "auto"."""
    if name == "auto":
        return contextlib.nullcontext
    if name not in SDPA_BACKENDS:
        raise AttentionChoiceError(f"unknown SDPA backend {name!r}", f"use auto or one of: {', '.join(SDPA_BACKENDS)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDP_BACKEND_NAMES[name])
    return lambda: sdpa_kernel([backend])
