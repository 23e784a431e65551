"""The hot path: one batch of frames -> images. Reads top to bottom like diffusers' `__call__`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .backends.base import Backend, UNetCond
from .consistency import Anchors
from .frames import Frames
from .jobs import BatchSettings, FrameJob
from .lora import LoraLibrary
from .schedulers import make_scheduler, make_steps
from .seeds import initial_latents
from .step_cache import StepCacheRun
from .text import PromptEncoder


@dataclass
class Expert:
    """A second model a batch is handed to part-way (the SDXL refiner): its bundle, backend and prompt cache."""

    model: Any
    backend: Backend
    encoder: PromptEncoder


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


def switch_index(scheduler, switch: float, base: bool) -> int:
    """Where the base model hands over to the refiner in `scheduler.timesteps`, exactly as diffusers splits them:
    the base runs the timesteps >= the cutoff (StableDiffusionXLPipeline's denoising_end), the refiner the rest
    (StableDiffusionXLImg2ImgPipeline's denoising_start, which for 2nd-order schedulers keeps step pairs whole)."""
    timesteps = scheduler.timesteps
    cutoff = int(round(scheduler.config.num_train_timesteps * (1 - switch)))
    if base:
        return int((timesteps >= cutoff).sum())
    n = int((timesteps < cutoff).sum())
    if scheduler.order == 2 and n % 2 == 0:
        n += 1
    return len(timesteps) - n


def guidance_embedding(guidance: float, dim: int, batch: int) -> torch.Tensor:
    """(batch, dim) sinusoidal embedding of (guidance - 1), the extra timestep input of guidance-distilled UNets
    (LCM): same formula as diffusers' get_guidance_scale_embedding."""
    w = torch.full((batch,), (guidance - 1.0) * 1000.0)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]  # (batch, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def render_batch(model, backend: Backend, encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings, *,
                 times: dict[str, float] | None = None, anchors: Anchors | None = None,
                 library: LoraLibrary | None = None, refiner: Expert | None = None, decoder: Backend | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> Frames:
    """Render frames that share `s`; returns their images (engine.frames: (H, W, 3) uint8 each), in job order.
    `times`, if given, accumulates host seconds per stage (lora, prompt, latents, unet, scheduler, decode; device
    work is asynchronous, so on a GPU these are launch times). `anchors`: record an anchor, or attend to the jobs'
    anchors (consistency). `library`: where the LoRA files of `s.loras` are read (the renderer's, so each file is
    read once per run). `refiner`: denoises the last (1 - s.refiner_switch) of the schedule; `decoder`: decodes
    instead of `backend` (a swapped VAE). `on_step(done, steps)`: after each denoising step is queued (no device
sync: on a GPU it runs ahead of the device by up to a batch)."""
    clock = _Clock(times)

    # 0. LoRA set: the backend merges it into its weights when it differs from the set it holds (else: nothing).
    backend.set_loras(s.loras, library or LoraLibrary(model))
    clock.lap("lora")
    device = backend.device
    cfg = _uses_cfg(model, s)

    # 1. Encode prompts (each unique prompt once per LoRA set and run: PromptEncoder caches).
    cond = _conditioning(model, encoder, jobs, s, cfg).to(device)
    clock.lap("prompt")

    # 2. Prepare latents: each frame's own generator, exactly as diffusers draws at batch size 1.
    scheduler = make_scheduler(s.scheduler, model.scheduler_config, s.timestep_spacing)
    scheduler.set_timesteps(s.steps, device=device)
    timesteps = scheduler.timesteps
    if refiner is not None:
        timesteps = timesteps[:switch_index(scheduler, s.refiner_switch, base=True)]
    shape = (model.latent_channels, s.height // model.vae_scale_factor, s.width // model.vae_scale_factor)
    latents, generators = initial_latents([j.seed for j in jobs], shape)
    latents = latents.to(device) * scheduler.init_noise_sigma
    if anchors is not None:
        cond.anchors = anchors.for_unet(timesteps, cfg)
    cond.cache = StepCacheRun(s.step_cache) if s.step_cache else None  # each batch starts with a full step
    clock.lap("latents")

    # 3. Denoise: CFG as one doubled batch; the scheduler works in float32 whatever the backend's dtype.
    steps = make_steps(scheduler, timesteps, 0, generators)
    latents = _denoise(backend, steps, timesteps, latents, cond, s.guidance if cfg else None, clock,
                       _progress(on_step, 0, s.steps))

    # 3b. Refine: the refiner's own scheduler, on the same timesteps, continues where the base stopped (diffusers'
    # ensemble of experts: the base's latents go to the refiner as they are, no noise added).
    if refiner is not None:
        r_cfg = _uses_cfg(refiner.model, s)
        r_cond = _conditioning(refiner.model, refiner.encoder, jobs, s, r_cfg).to(device)
        r_cond.cache = StepCacheRun(s.step_cache) if s.step_cache else None
        r_scheduler = make_scheduler(s.scheduler, refiner.model.scheduler_config, s.timestep_spacing)
        r_scheduler.set_timesteps(s.steps, device=device)
        start = switch_index(r_scheduler, s.refiner_switch, base=False)
        if hasattr(r_scheduler, "set_begin_index"):
            r_scheduler.set_begin_index(start)
        clock.lap("prompt")
        r_steps = make_steps(r_scheduler, r_scheduler.timesteps[start:], start, generators)
        latents = _denoise(refiner.backend, r_steps, r_scheduler.timesteps[start:], latents, r_cond,
                           s.guidance if r_cfg else None, clock, _progress(on_step, start, s.steps))

    # 4. Decode. The frames leave for the writer threads as uint8 without the render thread waiting for them
    # (engine.frames: converted and copied on the GPU, or converted by the writers on the CPU).
    images = (decoder or backend).decode(latents)  # (B, 3, H, W) in [0, 1]: clamped, so only NaN can remain
    frames = Frames(images)
    clock.lap("decode")
    return frames


def _uses_cfg(model, s: BatchSettings) -> bool:
    """Classifier-free guidance, as diffusers decides it: guidance > 1 and a UNet without a guidance embedding.
    Guidance <= 1 (few-step LoRAs run at 0 or 1) has no negative batch at all: half the UNet work."""
    return s.guidance > 1.0 and model.unet.config.time_cond_proj_dim is None


def _conditioning(model, encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings, cfg: bool) -> UNetCond:
    cond = stack_conditioning(encoder, jobs, s, cfg, aesthetic=getattr(model, "requires_aesthetics_score", False))
    guidance_dim = model.unet.config.time_cond_proj_dim  # guidance-distilled UNets (LCM) embed the guidance
    if guidance_dim is not None:
        cond.timestep_cond = guidance_embedding(s.guidance, guidance_dim, len(jobs))
    return cond


def _progress(on_step: Callable[[int, int], None] | None, offset: int, total: int
              ) -> Callable[[int], None] | None:
    """Step i of a loop that starts at schedule step `offset`, reported as (done, total) of the whole schedule."""
    return None if on_step is None else (lambda i: on_step(min(offset + i + 1, total), total))


def _denoise(backend: Backend, steps, timesteps, latents: torch.Tensor, cond: UNetCond, guidance: float | None,
             clock: _Clock, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """The denoise loop over `timesteps` with `steps` (engine.schedulers: diffusers' step, or its precomputed linear
    combinations); `guidance` None: no CFG batch."""
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, latents]) if guidance is not None else latents
        x = steps.scale(x, i)
        clock.lap("scheduler")
        noise = backend.denoise(x, t, cond).float()
        clock.lap("unet")
        if guidance is not None:
            noise = torch.lerp(*noise.chunk(2), guidance)  # uncond + guidance * (text - uncond), in one pass
        # A backend may hand out one output buffer per step (CUDA graphs): the stepper copies it if it keeps it.
        latents = steps.step(noise, i, latents, fresh=guidance is not None)
        if on_step is not None:
            on_step(i)
    clock.lap("scheduler")
    return latents


class _Clock:
    """Adds the seconds since the previous lap to times[name]; does nothing without a dict."""

    def __init__(self, times: dict[str, float] | None):
        self.times, self.t = times, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.times is not None:
            now = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + now - self.t
            self.t = now
