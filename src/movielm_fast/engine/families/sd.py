"""Stable Diffusion 1.x/2.x and SDXL: UNet2DConditionModel denoisers with CLIP text encoders, epsilon or v
prediction, the plan's choice of diffusers scheduler; the refiner, step cache, anchors and FP8 are theirs."""

from __future__ import annotations

import torch

from ..backends.base import UNetCond
from ..jobs import BatchSettings, FrameJob
from ..lora import DIFFUSERS_PREFIXES, KOHYA_PREFIXES
from ..schedulers import make_scheduler, make_steps
from ..seeds import initial_latents
from ..text import PromptEncoder

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's conditioning: diffusers' defaults


def stack_conditioning(encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings, cfg: bool,
                       aesthetic: bool = False) -> UNetCond:
    """`aesthetic`: the SDXL refiner's time ids, an aesthetic score in place of the target size."""
    pairs = encoder.encode_pairs([(j.prompt, j.negative_prompt) for j in jobs], s.loras)
    conds = ([neg for neg, _ in pairs] if cfg else []) + [pos for _, pos in pairs]  # negatives first, as diffusers
    hidden = torch.cat([c.hidden for c in conds])  # (B or 2B, 77 * chunks, D)
    if conds[0].pooled is None:
        return UNetCond(hidden)
    pooled = torch.cat([c.pooled for c in conds])  # (B or 2B, P)
    size = [s.height, s.width, 0, 0]  # original size, crop top-left
    if aesthetic:
        rows = [size + [NEGATIVE_AESTHETIC_SCORE]] * (len(conds) - len(jobs)) + [size + [AESTHETIC_SCORE]] * len(jobs)
    else:
        rows = [size + [s.height, s.width]] * len(conds)  # and the target size
    time_ids = torch.tensor(rows, dtype=hidden.dtype, device=hidden.device)  # (B or 2B, 6 or 5)
    return UNetCond(hidden, pooled, time_ids)


def guidance_embedding(guidance: float, dim: int, batch: int) -> torch.Tensor:
    """(batch, dim) sinusoidal embedding of (guidance - 1), the extra timestep input of guidance-distilled UNets
    (LCM): same formula as diffusers' get_guidance_scale_embedding."""
    w = torch.full((batch,), (guidance - 1.0) * 1000.0)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]  # (batch, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def uses_cfg(model, s: BatchSettings) -> bool:
    """Classifier-free guidance, as diffusers decides it: guidance > 1 and a UNet without a guidance embedding.
    Guidance <= 1 (few-step LoRAs run at 0 or 1) has no negative batch at all: half the UNet work."""
    return s.guidance > 1.0 and model.unet.config.time_cond_proj_dim is None


def conditioning(model, encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings, cfg: bool) -> UNetCond:
    cond = stack_conditioning(encoder, jobs, s, cfg, aesthetic=getattr(model, "requires_aesthetics_score", False))
    guidance_dim = model.unet.config.time_cond_proj_dim  # guidance-distilled UNets (LCM) embed the guidance
    if guidance_dim is not None:
        cond.timestep_cond = guidance_embedding(s.guidance, guidance_dim, len(jobs))
    return cond


class SDFamily:
    name = "SD 1.x/2.x and SDXL"
    kinds = ("sd", "sdxl")
    pipelines = ()  # recognised by engine.models itself (StableDiffusion*Pipeline, single files, refiners)
    cuda_dtype = "fp16"
    no_style_training = None  # style immobilization trains a CLIP token (style/training.py)

    def load(self, path, index, model_id, dtype, device, encoder_device=None):
        from ..models import load_sd_folder

        return load_sd_folder(path, index, model_id, dtype, device, encoder_device)

    def defaults(self, model) -> dict:
        return {}  # the native size (engine.models) is all they bring

    def check_config(self, config) -> None:
        pass  # every option of ModelConfig was made for these

    def check(self, model, s) -> list[str]:
        if s.true_cfg is not None and s.true_cfg > 1:
            return [f"true_cfg {s.true_cfg} is for FLUX.1 and is ignored: a UNet's guidance is classifier-free already"]
        return []

    def prompt_encoder(self, model, backend) -> PromptEncoder:
        return PromptEncoder(model, backend)

    def cfg_scale(self, model, s: BatchSettings) -> float | None:
        return s.guidance if uses_cfg(model, s) else None

    def conditioning(self, model, encoder, jobs, s, cfg) -> UNetCond:
        return conditioning(model, encoder, jobs, s, cfg)

    def scheduler(self, model, s: BatchSettings, device):
        scheduler = make_scheduler(s.scheduler, model.scheduler_config, s.timestep_spacing)
        scheduler.set_timesteps(s.steps, device=device)
        return scheduler

    def initial_latents(self, model, scheduler, seeds, s, device):
        shape = (model.latent_channels, s.height // model.vae_scale_factor, s.width // model.vae_scale_factor)
        latents, generators = initial_latents(seeds, shape)
        return latents.to(device) * scheduler.init_noise_sigma, generators

    def steps(self, scheduler, timesteps, generators):
        return make_steps(scheduler, timesteps, 0, generators)

    def unpack(self, model, latents, s):
        return latents  # the UNet's latents are the VAE's

    def a1111(self, settings):
        return None

    lora_prefixes = (KOHYA_PREFIXES, DIFFUSERS_PREFIXES)
    lora_folds_alphas = False

    def lora_state_dict(self, state, model):
        from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

        xl = model.kind == "sdxl"
        mixin = StableDiffusionXLLoraLoaderMixin if xl else StableDiffusionLoraLoaderMixin
        # The diffusers SDXL pipeline passes its UNet config so that sgm (input_blocks...) names are remapped.
        converted, _ = mixin.lora_state_dict(state, **({"unet_config": model.unet.config} if xl else {}))
        return converted, {}


SD = SDFamily()
