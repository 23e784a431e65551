"""The hot path: one batch of frames -> images. Reads top to bottom like diffusers' `__call__`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .backends.base import Backend, UNetCond
from .consistency import Anchors
from .families import family_of
from .families.sd import conditioning as _conditioning
from .families.sd import uses_cfg as _uses_cfg
from .frames import Frames
from .jobs import BatchSettings, FrameJob
from .lora import LoraLibrary
from .schedulers import make_scheduler, make_steps
from .step_cache import StepCacheRun
from .text import PromptEncoder


@dataclass
class Expert:
    """A second model a batch is handed to part-way (the SDXL refiner): its bundle, backend and prompt cache."""

    model: Any
    backend: Backend
    encoder: PromptEncoder


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
    family = family_of(model)  # engine.families: what differs between SD/SDXL, FLUX.1 and FLUX.2 [klein]

    # 0. LoRA set: the backend merges it into its weights when it differs from the set it holds (else: nothing).
    backend.set_loras(s.loras, library or LoraLibrary(model))
    clock.lap("lora")
    device = backend.device
    guidance = family.cfg_scale(model, s)  # None: no negative batch

    # 1. Encode prompts (each unique prompt once per LoRA set and run: the prompt encoder caches).
    cond = family.conditioning(model, encoder, jobs, s, guidance is not None).to(device)
    clock.lap("prompt")

    # 2. Prepare latents: each frame's own generator, exactly as diffusers draws at batch size 1.
    scheduler = family.scheduler(model, s, device)
    timesteps = scheduler.timesteps
    if refiner is not None:
        timesteps = timesteps[:switch_index(scheduler, s.refiner_switch, base=True)]
    latents, generators = family.initial_latents(model, scheduler, [j.seed for j in jobs], s, device)
    if anchors is not None:
        cond.anchors = anchors.for_unet(timesteps, guidance is not None)
    cond.cache = StepCacheRun(s.step_cache) if s.step_cache else None  # each batch starts with a full step
    clock.lap("latents")

    # 3. Denoise: CFG as one doubled batch; the scheduler works in float32 whatever the backend's dtype.
    steps = family.steps(scheduler, timesteps, generators)
    latents = _denoise(backend, steps, timesteps, latents, cond, guidance, clock, _progress(on_step, 0, s.steps))

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
    images = (decoder or backend).decode(family.unpack(model, latents, s))  # (B, 3, H, W) in [0, 1], clamped
    frames = Frames(images)
    clock.lap("decode")
    return frames


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
