"""The forward of every exported component, as one torch module each.

The torch backend runs exactly these modules and the ONNX exporter traces exactly these modules, so what is
exported and what the reference backend computes cannot drift apart. Inputs and outputs follow the component's
`ModelSpec` (export/specs.py): the token lookup stays on the host (the text encoder starts at `inputs_embeds`), and
the latent scaling and the [-1, 1] -> [0, 1] map are inside the VAE decoder, so runtimes only move tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import UNET, VAE_DECODER, text_encoder_component


class TextEncoderGraph(nn.Module):
    """A CLIP text transformer that takes token embeddings instead of token ids.

    (inputs_embeds, eos_index) -> (last hidden state after the final LayerNorm, penultimate layer output, pooled
    output): SD 1.x/2.x use the first, SDXL the second and the (projected) third. `eos_index` picks the pooled token.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        core = clip.text_model if hasattr(clip, "text_model") else clip
        self.embeddings = core.embeddings
        self.layers = core.encoder.layers
        self.final_layer_norm = core.final_layer_norm
        self.text_projection = getattr(clip, "text_projection", None)

    def forward(self, inputs_embeds: torch.Tensor, eos_index: torch.Tensor):
        h = self.embeddings(inputs_embeds=inputs_embeds)  # (B, tokens, D), position embeddings added
        n = h.shape[1]
        causal = torch.full((n, n), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)[None, None]
        for layer in self.layers[:-1]:
            h = layer(h, causal)
        penultimate = h
        last = self.final_layer_norm(self.layers[-1](h, causal))
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_index]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return last, penultimate, pooled


class UNetGraph(nn.Module):
    """One noise prediction. `text_embeds`/`time_ids`: SDXL's pooled text and size conditioning; `timestep_cond`:
    the guidance embedding of guidance-distilled (LCM) UNets (torch backend only: the exported spec has no such
    input). Arguments are positional so the same call serves tracing, CUDA-graph replay and torch.compile."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    """Scaled latents -> images in [0, 1]. Serves AutoencoderKL and AutoencoderTiny (TAESD) alike: TAESD decodes
    the scaled latents as they are, and its config says so with scaling_factor 1.0, as diffusers' pipelines read it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents):
        images = self.vae.decode(latents / self.scaling_factor + self.shift_factor, return_dict=False)[0]
        if images.dtype != torch.float32:
            # Half-precision torch runs map to [0, 1] in fp32 (in bf16 the +0.5 alone rounds by up to 1/512).
            # Exports are traced in fp32, so their graphs get no Cast from this.
            images = images.float()
        return (images / 2 + 0.5).clamp(0, 1)


def graph_modules(model) -> dict[str, nn.Module]:
    """The forward module of every component of a ModelBundle, named as `model_specs` names them. They wrap the
    model's own modules (no copies): moving or casting one moves or casts the model's module."""
    graphs: dict[str, nn.Module] = {text_encoder_component(i): TextEncoderGraph(enc)
                                    for i, enc in enumerate(model.text_encoders)}
    if model.unet is not None:  # partial bundles (engine.models): a refiner has no VAE, a swapped VAE only that
        graphs[UNET] = UNetGraph(model.unet)
    if model.vae is not None:
        graphs[VAE_DECODER] = VaeDecoderGraph(model.vae)
    return graphs
