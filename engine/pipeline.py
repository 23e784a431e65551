"""The hot path: one batch of frames -> images. Reads top to bottom like diffusers' `__call__`."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np
import torch

from .backends.base import Backend, UNetCond
from .consistency import Anchors, AnchorSpec
from .lora import LoraLibrary, LoraSet
from .schedulers import make_scheduler
from .seeds import initial_latents
from .text import PromptEncoder


@dataclass(frozen=True)
class BatchSettings:
    """What frames in one batch must share."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    loras: LoraSet = ()  # the LoRA set merged into the weights (engine.lora): one set per batch


@dataclass
class FrameJob:
    movie_id: str
    frame_id: str
    prompt: str
    negative_prompt: str
    seed: int
    anchors: tuple[AnchorSpec, ...] = ()  # the characters whose anchors it attends to (consistency mode)


def stack_conditioning(encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings, cfg: bool
                       ) -> UNetCond:
    pairs = [encoder.encode_pair(j.prompt, j.negative_prompt, s.loras) for j in jobs]
    conds = ([neg for neg, _ in pairs] if cfg else []) + [pos for _, pos in pairs]  # negatives first, as diffusers
    hidden = torch.cat([c.hidden for c in conds])  # (B or 2B, 77 * chunks, D)
    if conds[0].pooled is None:
        return UNetCond(hidden)
    pooled = torch.cat([c.pooled for c in conds])  # (B or 2B, P)
    time_ids = torch.tensor([[s.height, s.width, 0, 0, s.height, s.width]], dtype=hidden.dtype)
    return UNetCond(hidden, pooled, time_ids.repeat(len(conds), 1))  # (B or 2B, 6): original size, crop, target


def guidance_embedding(guidance: float, dim: int, batch: int) -> torch.Tensor:
    """(batch, dim) sinusoidal embedding of (guidance - 1), the extra timestep input of guidance-distilled UNets
    (LCM): same formula as diffusers' get_guidance_scale_embedding."""
    w = torch.full((batch,), (guidance - 1.0) * 1000.0)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]  # (batch, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def render_batch(model, backend: Backend, encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings,
                 times: dict[str, float] | None = None, anchors: Anchors | None = None,
                 library: LoraLibrary | None = None) -> np.ndarray:
    """Render frames that share `s`; returns their (B, H, W, 3) uint8 images, in job order. `times`, if given,
    accumulates host seconds per stage (lora, prompt, latents, unet, scheduler, decode; device work is asynchronous,
    so on a GPU these are launch times). `anchors`: record an anchor, or attend to the jobs' anchors (consistency).
    `library`: where the LoRA files of `s.loras` are read (the renderer's, so each file is read once per run)."""
    clock = _Clock(times)

    # 0. LoRA set: the backend merges it into its weights when it differs from the set it holds (else: nothing).
    backend.set_loras(s.loras, library or LoraLibrary(model))
    clock.lap("lora")
    device = backend.device
    guidance_dim = model.unet.config.time_cond_proj_dim  # set for guidance-distilled UNets: no CFG batch
    cfg = s.guidance > 1.0 and guidance_dim is None

    # 1. Encode prompts (each unique prompt once per LoRA set and run: PromptEncoder caches).
    cond = stack_conditioning(encoder, jobs, s, cfg)
    if guidance_dim is not None:
        cond.timestep_cond = guidance_embedding(s.guidance, guidance_dim, len(jobs))
    cond = cond.to(device)
    clock.lap("prompt")

    # 2. Prepare latents: each frame's own generator, exactly as diffusers draws at batch size 1.
    scheduler = make_scheduler(s.scheduler, model.scheduler_config)
    scheduler.set_timesteps(s.steps, device=device)
    shape = (model.latent_channels, s.height // model.vae_scale_factor, s.width // model.vae_scale_factor)
    latents, generators = initial_latents([j.seed for j in jobs], shape)
    latents = latents.to(device) * scheduler.init_noise_sigma
    if anchors is not None:
        cond.anchors = anchors.for_unet(scheduler.timesteps, cfg)
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generators} if "generator" in step_params else {}
    if "eta" in step_params:
        step_kwargs["eta"] = 0.0
    clock.lap("latents")

    # 3. Denoise: CFG as one doubled batch; the scheduler works in float32 whatever the backend's dtype.
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        clock.lap("scheduler")
        noise = backend.denoise(x, t, cond).float()
        clock.lap("unet")
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + s.guidance * (text - uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    clock.lap("scheduler")

    # 4. Decode, and convert to uint8 where the pixels are: a quarter of the bytes cross to the host.
    images = backend.decode(latents)  # (B, 3, H, W) in [0, 1]: clamped, so only NaN can remain of an overflow
    if torch.isnan(images.sum()):  # one reduction instead of a boolean image
        raise FloatingPointError("the decoded image contains NaN/inf (numeric overflow)")
    # One pass into a contiguous (B, H, W, 3) buffer: a strided view would be copied again, twice per frame,
    # by PIL on the writer threads (measured: 2.7 ms per 512² frame each).
    pixels = torch.empty((images.shape[0], *images.shape[2:], 3), dtype=torch.uint8, device=images.device)
    pixels.copy_(torch.mul(images, 255).round_().permute(0, 2, 3, 1))  # exact integers: the cast truncates nothing
    pixels = pixels.cpu().numpy()
    clock.lap("decode")
    return pixels


class _Clock:
    """Adds the seconds since the previous lap to times[name]; does nothing without a dict."""

    def __init__(self, times: dict[str, float] | None):
        self.times, self.t = times, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.times is not None:
            now = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + now - self.t
            self.t = now
