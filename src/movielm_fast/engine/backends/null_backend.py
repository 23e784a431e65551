"""`--backend null`: a zero-cost backend, for measuring the engine's own work. Not for images.

Text encoding returns zeros, denoising returns zeros, and decoding returns one fixed, detailed, noise-like image of
the requested size (image encoders then work as hard as on a real frame, which flat colour would not make them).
Everything else -- plans, prompts and tokenisation, seeds and latents, the scheduler, batching, the writer stage,
manifests, storyboards -- runs for real, so `movielm-fast render plan.json --backend null` shows how fast the
engine can feed a GPU that costs nothing.
"""

from __future__ import annotations

import torch

from .base import UNetCond, register


@register("null")
class NullBackend:
    name = "null"

    def __init__(self, model, config):
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.kind = model.kind
        self.widths = [enc.config.hidden_size for enc in model.text_encoders]
        self.pooled = [getattr(enc.config, "projection_dim", enc.config.hidden_size) for enc in model.text_encoders]
        self.vae_scale_factor = model.vae_scale_factor
        self._images: dict[tuple[int, int], torch.Tensor] = {}

    def encode_text(self, encoder_index, inputs_embeds, eos_index):
        b, n = inputs_embeds.shape[:2]
        hidden = torch.zeros(b, n, self.widths[encoder_index])
        return hidden, hidden, torch.zeros(b, self.pooled[encoder_index])

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: UNetCond) -> torch.Tensor:
        return torch.zeros_like(latents)

    def set_loras(self, loras, library) -> None:
        pass  # no weights to change

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor
        if (h, w) not in self._images:  # made once per size, from a fixed seed: every run sees the same pixels
            g = torch.Generator().manual_seed(0)
            self._images[h, w] = torch.rand((1, 3, h, w), generator=g)
        return self._images[h, w].expand(latents.shape[0], -1, -1, -1)
