"""The forward of every exported component, as one torch module each.

The torch backend runs exactly these modules and the ONNX exporter traces exactly these modules, so what is
exported and what the reference backend computes cannot drift apart. Inputs and outputs follow the component's
`ModelSpec` (export/specs.py): the token lookup stays on the host (the text encoder starts at `inputs_embeds`), and
the latent scaling and the [-1, 1] -> [0, 1] map are inside the VAE decoder, so runtimes only move tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import QWEN3_LAYERS, TRANSFORMER, UNET, VAE_DECODER, text_encoder_component


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


class T5EncoderGraph(nn.Module):
    """T5's encoder from token embeddings: (inputs_embeds,) -> (hidden,). FLUX.1 conditions on its last hidden
    state over the whole padded sequence, padding unmasked, as diffusers' FluxPipeline calls it."""

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.encoder = t5.encoder

    def forward(self, inputs_embeds: torch.Tensor, eos_index: torch.Tensor | None = None):
        return (self.encoder(inputs_embeds=inputs_embeds, return_dict=False)[0],)


class Qwen3EncoderGraph(nn.Module):
    """Qwen3 from token embeddings: (inputs_embeds, lengths) -> (hidden,), the hidden states of QWEN3_LAYERS side by
    side (B, tokens, 3 * D), as FLUX.2 [klein] conditions on them. `lengths`: real tokens per row, the rest is
    padding and masked (diffusers' Flux2KleinPipeline passes the tokenizer's attention mask)."""

    def __init__(self, qwen: nn.Module):
        super().__init__()
        self.model = getattr(qwen, "model", qwen)  # Qwen3ForCausalLM's base model, or a Qwen3Model

    def forward(self, inputs_embeds: torch.Tensor, lengths: torch.Tensor):
        b, n, _ = inputs_embeds.shape
        mask = (torch.arange(n, device=inputs_embeds.device)[None] < lengths[:, None]).long()  # (B, tokens)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
        layers = torch.stack([out.hidden_states[k] for k in QWEN3_LAYERS], dim=1)  # (B, 3, tokens, D)
        return (layers.permute(0, 2, 1, 3).reshape(b, n, -1),)


def text_encoder_graph(encoder: nn.Module) -> nn.Module:
    """The graph of a text encoder, by its architecture: CLIP, T5 (FLUX.1) or Qwen3 (FLUX.2 [klein])."""
    kind = getattr(encoder.config, "model_type", "")
    if kind == "t5":
        return T5EncoderGraph(encoder)
    if kind == "qwen3":
        return Qwen3EncoderGraph(encoder)
    return TextEncoderGraph(encoder)


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


class TransformerGraph(nn.Module):
    """One velocity prediction of a flow-matching transformer (FluxTransformer2DModel, Flux2Transformer2DModel) on
    packed latents (B, N, C). The scheduler's timestep goes in as the UNet's does ((1,) or 0-d, 0..1000) and is
    scaled to 0..1 here, in the model's dtype as diffusers' pipelines do; `guidance` (FLUX.1 [dev]) is one number
    for the batch. The position ids have no batch axis; the optional inputs come before them in the signature so
    that every variant is one positional call (pooled_projections: FLUX.1 only)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections=None, guidance=None,
                txt_ids=None, img_ids=None):
        b = hidden_states.shape[0]
        t = timestep.to(hidden_states.dtype).reshape(1).expand(b) / 1000
        extra = {} if pooled_projections is None else {"pooled_projections": pooled_projections}
        if guidance is not None:
            guidance = guidance.float().reshape(1).expand(b)
        return self.transformer(hidden_states=hidden_states, timestep=t, encoder_hidden_states=encoder_hidden_states,
                                guidance=guidance, txt_ids=txt_ids, img_ids=img_ids, return_dict=False, **extra)[0]


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.float32:
        # Half-precision torch runs map to [0, 1] in fp32 (in bf16 the +0.5 alone rounds by up to 1/512).
        # Exports are traced in fp32, so their graphs get no Cast from this.
        images = images.float()
    return (images / 2 + 0.5).clamp(0, 1)


class VaeDecoderGraph(nn.Module):
    """Scaled latents -> images in [0, 1]. Serves AutoencoderKL and AutoencoderTiny (TAESD) alike: TAESD decodes
    the scaled latents as they are, and its config says so with scaling_factor 1.0, as diffusers' pipelines read it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents):
        return _unit_range(self.vae.decode(latents / self.scaling_factor + self.shift_factor, return_dict=False)[0])


class Flux2VaeDecoderGraph(nn.Module):
    """FLUX.2's VAE (AutoencoderKLFlux2): its latents come as the transformer leaves them, 2x2 patches folded into
    channels (B, 4C, h/2, w/2) and normalized by the VAE's batch-norm statistics; both are undone here, as
    diffusers' Flux2KleinPipeline does before `vae.decode`."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        x = latents * std + bn.running_mean.view(1, -1, 1, 1)
        b, c4, h, w = x.shape
        x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)
        return _unit_range(self.vae.decode(x, return_dict=False)[0])


def vae_decoder_graph(vae: nn.Module) -> nn.Module:
    return Flux2VaeDecoderGraph(vae) if hasattr(vae, "bn") else VaeDecoderGraph(vae)


def graph_modules(model) -> dict[str, nn.Module]:
    """The forward module of every component of a ModelBundle, named as `model_specs` names them. They wrap the
    model's own modules (no copies): moving or casting one moves or casts the model's module."""
    graphs: dict[str, nn.Module] = {text_encoder_component(i): text_encoder_graph(enc)
                                    for i, enc in enumerate(model.text_encoders)}
    if model.unet is not None:  # partial bundles (engine.models): a refiner has no VAE, a swapped VAE only that
        graphs[UNET] = UNetGraph(model.unet)
    if getattr(model, "transformer", None) is not None:
        graphs[TRANSFORMER] = TransformerGraph(model.transformer)
    if model.vae is not None:
        graphs[VAE_DECODER] = vae_decoder_graph(model.vae)
    return graphs
