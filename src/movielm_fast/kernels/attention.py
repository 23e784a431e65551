"""Attention processors: how the UNet and VAE run attention, chosen by `--attention sdpa|triton|xformers`.

Everything is installed through diffusers' own `set_attn_processor`; no library code is patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
from diffusers.utils import is_xformers_available
from torch import nn

from ._runtime import triton_available
from .flash_attention import flash_attention, flash_attention_supported

ATTENTION_CHOICES = ("sdpa", "triton", "xformers")


class AttentionChoiceError(ValueError):
    """`--attention NAME` cannot run here (unknown name, or its library or GPU is missing). `hint` says what to use
    instead; the engine shows both to the user (kernels know nothing of the engine's error types)."""

    def __init__(self, message: str, hint: str):
        super().__init__(f"{message} ({hint})")
        self.message = message
        self.hint = hint


class TritonFlashAttnProcessor:
    """diffusers attention processor that runs `kernels.flash_attention` where it applies.

    Same steps as diffusers' AttnProcessor2_0. Calls the kernel cannot serve -- an attention mask, head dims
    above 256 (the VAE's single 512-wide head), CPU tensors outside the Triton interpreter -- go to
    `F.scaled_dot_product_attention`, so installing it on a whole UNet or VAE is always safe.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        image_input = hidden_states.ndim == 4
        if image_input:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, tokens, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_tokens, _ = context.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (B, heads, N, M)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # Strided views, not copies: the kernel takes any strides.
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, M, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, M, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None and flash_attention_supported(query, key, value) and triton_available(query.device):
            out = flash_attention(query, key, value, scale=attn.scale)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, heads * d)

        out = attn.to_out[0](out)  # output projection
        out = attn.to_out[1](out)  # dropout (identity at inference)
        if image_input:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_processor(name: str):
    """A fresh processor for `--attention NAME`; AttentionChoiceError if NAME cannot run here."""
    if name == "sdpa":
        return AttnProcessor2_0()
    if name == "triton":
        if not triton_available():
            raise AttentionChoiceError("--attention triton needs Triton and a CUDA GPU",
                                       "pip install 'movielm-fast[kernels]' on a CUDA machine, or use --attention sdpa")
        return TritonFlashAttnProcessor()
    if name == "xformers":
        if not is_xformers_available():
            raise AttentionChoiceError("xformers is not installed", "pip install xformers, or use --attention sdpa")
        return XFormersAttnProcessor()
    raise AttentionChoiceError(f"unknown attention implementation {name!r}",
                               f"use one of: {', '.join(ATTENTION_CHOICES)}")


def install_attention(module: nn.Module, name: str) -> None:
    """Give every attention layer of a diffusers UNet or VAE the `name` processor (diffusers' own API)."""
    module.set_attn_processor(attention_processor(name))
