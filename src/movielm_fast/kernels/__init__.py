"""Triton kernels for the GPU fast path, each with a plain-PyTorch `*_ref` twin.

Importing this package never imports Triton; the kernels import it on first use. Public entry points:

- `flash_attention` / `flash_attention_ref` (kernels.flash_attention)
- `attention_processor`, `install_attention` (kernels.attention)
- `triton_available`, `KernelUnavailable` (kernels._runtime)
"""

from ._runtime import KernelUnavailable, triton_available

__all__ = ["KernelUnavailable", "triton_available"]
