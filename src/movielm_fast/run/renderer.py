"""What a worker holds: the loaded model, its backend and the prompt encoder -- and what it does with them.

One `Renderer` lives in the local process (local runs) or in each Ray worker. The driver (run.driver) talks to it
only through an executor; every method here does one thing: bind style tokens, plan frames, render a batch, train
a style, measure a batch size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from movielm_fast.engine.backends.base import create_backend
from movielm_fast.engine.config import EngineConfig
from movielm_fast.engine.consistency import AnchorRecord, Anchors, anchor_seed
from movielm_fast.engine.fp8 import check_quantize
from movielm_fast.engine.frames import Frames
from movielm_fast.engine.jobs import AnchorSpec, BatchSettings, FrameJob
from movielm_fast.engine.lora import LoraLibrary, LoraSet, combine, lora_ref, set_key
from movielm_fast.engine.models import (
    load_model,
    load_refiner,
    load_vae,
    model_defaults,
    native_size,
    size_warning,
    style_training_note,
)
from movielm_fast.engine.pipeline import Expert, render_batch
from movielm_fast.engine.seeds import frame_seed
from movielm_fast.engine.step_cache import check_step_cache
from movielm_fast.engine.text import PromptEncoder
from movielm_fast.errors import UserError
from movielm_fast.plan import LoadedMovie, RenderSettings, Style
from movielm_fast.style.immobilize import immobilize_style
from movielm_fast.style.scenes import SceneRenderer

from .batching import CPU_AUTO_BATCH, MAX_AUTO_BATCH, throughput_batch
from .prompts import frame_characters, frame_prompt, style_prefix
from .startup import timed
from .tasks import FrameTask, ModelInfo, StyleToken

log = logging.getLogger("movielm_fast")


class Renderer:
    """Holds the loaded model, backend and prompt cache; renders any number of movies.

    `model` and `backend` may be passed in (tests wrap a backend, benchmarks reuse a loaded model); by default
    they are loaded from `config`."""

    def __init__(self, config: EngineConfig, model=None, backend=None):
        self.config = config
        config.torch_device  # fail fast on a bad device before loading gigabytes
        if config.torch_device.type == "cpu" and config.torch_dtype == torch.float16:
            # CPUs have no fp16 matrix units PyTorch uses: every op converts, measured 6x slower than fp32 here.
            log.warning("--dtype fp16 on the CPU is emulated and several times slower than fp32: use --dtype fp32 "
                        "(or --dtype auto); fp16 is for --device cuda")
        self.step_cache = check_step_cache(config.step_cache, config.step_cache_depth, config.backend)
        check_quantize(config.quantize, config.backend, config.torch_device)
        self.startup: dict[str, float] = {}  # run.startup phases of this renderer's set-up
        with timed(self.startup, "model_load"):
            # The torch backend runs the loaded modules themselves: load them as it will run them. Exporters
            # (ONNX Runtime, TensorRT) trace float32 modules on the host.
            target = (config.torch_dtype, config.torch_device) if config.backend == "torch" else None
            self.model = model or load_model(config.model, target=target)
        self.startup.update(self.model.load_seconds if model is None else {})
        with timed(self.startup, "backend_setup"):
            self.backend = backend or create_backend(config.backend, self.model, config)
        self.encoder = PromptEncoder(self.model, self.backend)
        self.loras = LoraLibrary(self.model)  # each LoRA file read once, for planning and merging
        self.times: dict[str, float] = {}  # host seconds per pipeline stage, over every batch rendered here
        self.anchor_records: OrderedDict[str, AnchorRecord] = OrderedDict()
        self.tokens: dict[str, StyleToken] = {}  # bound so far: a refiner loaded later binds them too
        self.refiners: dict[str, Expert] = {}  # by resolved folder, loaded on first use
        self.decoders: dict[str, Any] = {}  # swapped VAEs' backends, by resolved folder
        self.vae_hashes: dict[str, str] = {}
        self.defaults = model_defaults(self.model)
        self._size_warned: set[tuple[int, int]] = set()
        self.on_step: Callable[[int, int], None] | None = None  # (done, steps) of the batch rendering now
        # Given as flags, a bad refiner or VAE fails the run here, before any frame (in a plan: the movie fails).
        if config.overrides.refiner:
            self._refiner(config.overrides.refiner)
        if config.overrides.vae:
            self._decoder(config.overrides.vae)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model.model_id, self.model.content_hash, self.model.kind, self.config.dtype_name,
                         self.config.backend, self.defaults, style_training_note(self.model))

    def bind(self, tokens: list[StyleToken]) -> None:
        """Make the style tokens known to the prompt encoder (already bound ones are skipped)."""
        for t in tokens:
            self.encoder.add_token(t.token, list(t.vectors), t.source)
            self.tokens[t.token] = t
            for r in self.refiners.values():
                r.encoder.add_token(t.token, list(t.vectors[-1:]), t.source)  # its one encoder is SDXL's second

    def _refiner(self, path: str) -> Expert:
        """The SDXL refiner in `path`, loaded, checked against the base model and given a backend, once."""
        if path not in self.refiners:
            if self.model.kind != "sdxl":
                raise UserError(f"the refiner {path} is for SDXL; the model {self.model.model_id} is "
                                f"{'SD 1.x/2.x' if self.model.kind == 'sd' else self.model.kind}",
                                "use an SDXL base model with --refiner, or render without the refiner")
            bundle = load_refiner(path)
            if bundle.latent_channels != self.model.latent_channels or \
                    bundle.vae_scale_factor != self.model.vae_scale_factor:
                raise UserError(f"the refiner {path} works on {bundle.latent_channels}-channel latents at 1/"
                                f"{bundle.vae_scale_factor} scale; the model's are {self.model.latent_channels}-"
                                f"channel at 1/{self.model.vae_scale_factor}", "use the refiner of this base model")
            backend = create_backend(self.config.backend, bundle, self.config)
            expert = Expert(bundle, backend, PromptEncoder(bundle, backend))
            for t in self.tokens.values():
                expert.encoder.add_token(t.token, list(t.vectors[-1:]), t.source)
            self.refiners[path] = expert
        return self.refiners[path]

    def _decoder(self, path: str):
        """A backend that decodes with the VAE in `path` (checked against the model's latents), made once."""
        if path not in self.decoders:
            bundle = load_vae(path)
            if bundle.latent_channels != self.model.latent_channels or \
                    bundle.vae_scale_factor != self.model.vae_scale_factor:
                raise UserError(f"the VAE {path} decodes {bundle.latent_channels}-channel latents at 1/"
                                f"{bundle.vae_scale_factor} scale; the model {self.model.model_id} makes "
                                f"{self.model.latent_channels}-channel latents at 1/{self.model.vae_scale_factor}",
                                "use a VAE of this model family (SD 1.x/2.x and SDXL: 4 channels, 1/8)")
            self.decoders[path] = create_backend(self.config.backend, bundle, self.config)
            self.vae_hashes[path] = bundle.content_hash
        return self.decoders[path]

    def anchor_specs(self, lm: LoadedMovie, token: str | None, overrides: RenderSettings) -> dict[str, AnchorSpec]:
        """Character name -> its anchor (consistency mode), or {} when the movie's mode is off."""
        s = self.info.resolved(lm, overrides)
        cons = s.consistency
        if self.config.consistency is not None:
            cons = cons.model_copy(update={"mode": self.config.consistency})
        if cons.mode == "none":
            return {}
        bs = batch_settings(s, self.lora_set(lm))
        return {c.name: AnchorSpec(lm.movie.id, c.name, style_prefix(lm.movie, token) + c.appearance,
                                   s.negative_prompt, anchor_seed(s.seed, c.name), bs, cons, self.model.content_hash)
                for c in lm.movie.characters}

    def lora_set(self, lm: LoadedMovie) -> LoraSet:
        """The movie's LoRA set: --lora ones, then its style's, then its own (engine.lora.combine), each checked
        against the model (a LoRA for another model is a UserError naming it)."""
        named = [("--lora", p, s) for p, s in self.config.loras] + \
                [(f"movie {lm.movie.id!r} {where}", p, s) for where, p, s in lm.lora_files()]
        for what, path, scale in named:
            self.loras.layers(lora_ref(path, scale), f"{what} LoRA")
        return combine([(path, scale) for _, path, scale in named])

    def tasks(self, lm: LoadedMovie, token: str | None, overrides: RenderSettings) -> list[FrameTask]:
        """Every frame of one movie as a task. `token`: the movie's bound style token, if any."""
        s = self.info.resolved(lm, overrides)
        self._check_size(s)
        loras = self.lora_set(lm)
        bs = replace(batch_settings(s, loras), step_cache=self.step_cache)
        self._experts(bs)  # a bad refiner or VAE fails the movie here, before any of its frames
        extra = self._expert_key(bs)
        anchors = self.anchor_specs(lm, token, overrides)
        if anchors and self.step_cache:
            raise UserError(f"movie {lm.movie.id!r}: consistency mode cannot run with --step-cache (anchor attention "
                            "records and reads every attention layer at every step; cached steps skip the deep ones)",
                            "drop --step-cache, or render this movie with --consistency none")
        tasks = []
        for frame in lm.movie.frames:
            prompt = frame_prompt(lm.movie, frame, token)
            seed = frame_seed(s.seed, frame.id, frame.seed, s.seed_mode)
            own = tuple(anchors[name] for name in frame_characters(lm.movie, frame)) if anchors else ()
            job = FrameJob(lm.movie.id, frame.id, prompt, s.negative_prompt, seed, own)
            key = {"prompt": prompt, "negative_prompt": s.negative_prompt, "seed": seed, "width": s.width,
                   "height": s.height, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
                   "dtype": self.config.dtype_name, "model_hash": self.model.content_hash, **extra}
            if loras:  # frames without LoRAs keep the key they always had, so earlier outputs still resume
                key["loras"] = set_key(loras)
            if bs.step_cache:  # lossy: its frames differ; frames rendered without it keep their keys
                key["step_cache"] = bs.step_cache.key()
            if self.config.quantize:  # lossy, likewise
                key["quantize"] = self.config.quantize
            if own:  # frames without characters render exactly as without the mode: their key stays the same
                key["consistency"] = {**own[0].consistency.model_dump(), "anchors": [a.key for a in own]}
            tasks.append(FrameTask(job, bs, self.encoder.pair_chunks(prompt, s.negative_prompt), key, frame.dialogue))
        return tasks

    def _check_size(self, s: RenderSettings) -> None:
        """Warn once per size that is far from the model's native one (given by the plan or a flag: the model's own
        default never is)."""
        native = native_size(self.model)
        if (s.width, s.height) not in self._size_warned:
            self._size_warned.add((s.width, s.height))
            warning = size_warning(s.width, s.height, native)
            if warning:
                log.warning(warning)

    def _expert_key(self, bs: BatchSettings) -> dict[str, Any]:
        """What the few-step, refiner and VAE settings add to a frame's key (nothing when unused, so the keys of
        earlier renders stay the same and they resume)."""
        extra: dict[str, Any] = {}
        if bs.timestep_spacing:
            extra["timestep_spacing"] = bs.timestep_spacing
        if bs.refiner:
            extra["refiner"] = {"id": Path(bs.refiner).name, "hash": self._refiner(bs.refiner).model.content_hash,
                                "switch": bs.refiner_switch}
        if bs.vae:
            self._decoder(bs.vae)
            extra["vae"] = {"id": Path(bs.vae).name, "hash": self.vae_hashes[bs.vae]}
        return extra

    def render(self, jobs: list[FrameJob], settings: BatchSettings, want_anchors: frozenset[str] = frozenset()
               ) -> tuple[Frames, list[tuple[AnchorSpec, np.ndarray]]]:
        """The frames' images (engine.frames), and (spec, (H, W, 3) uint8 image) of the anchors named in
        `want_anchors` that these frames use (the driver asks for those it has not saved yet)."""
        per_job = [[self._anchor(spec) for spec in job.anchors] for job in jobs]
        specs = {spec.key: spec for job in jobs for spec in job.anchors}
        anchors = Anchors(next(iter(specs.values())).consistency, per_job=per_job) if specs else None
        refiner, decoder = self._experts(settings)
        images = render_batch(self.model, self.backend, self.encoder, jobs, settings, times=self.times,
                              anchors=anchors, library=self.loras, refiner=refiner, decoder=decoder,
                              on_step=self.on_step)
        records = {r.spec.key: r for recs in per_job for r in recs}
        return images, [(specs[k], records[k].image) for k in specs if k in want_anchors]

    def _anchor(self, spec: AnchorSpec) -> AnchorRecord:
        """The anchor's record, rendering the anchor first if this renderer has not kept it. Records are kept
        most-recently-used first within `config.anchor_cache_mb`; one dropped is recomputed when needed again
        (anchors are deterministic)."""
        key = spec.key
        if key in self.anchor_records:
            self.anchor_records.move_to_end(key)
            return self.anchor_records[key]
        record = AnchorRecord(spec)
        job = FrameJob(spec.movie_id, f"anchor:{spec.character}", spec.prompt, spec.negative_prompt, spec.seed)
        refiner, decoder = self._experts(spec.settings)
        record.image = render_batch(self.model, self.backend, self.encoder, [job], spec.settings, times=self.times,
                                    anchors=Anchors(spec.consistency, record=record), library=self.loras,
                                    refiner=refiner, decoder=decoder)[0]
        self.anchor_records[key] = record
        budget = self.config.anchor_cache_mb * 2**20
        while len(self.anchor_records) > 1 and sum(r.nbytes for r in self.anchor_records.values()) > budget:
            self.anchor_records.popitem(last=False)
        return record

    def _experts(self, s: BatchSettings) -> tuple[Expert | None, Any]:
        """(refiner, decoder) for a batch with settings `s`."""
        return (self._refiner(s.refiner) if s.refiner else None), (self._decoder(s.vae) if s.vae else None)

    @property
    def scene_renderer(self) -> SceneRenderer:
        """What style training uses of this renderer: the model, its device, and frames without anchors."""
        return SceneRenderer(self.model, self.backend.device, lambda jobs, settings: self.render(jobs, settings)[0])

    def train_style(self, style: Style) -> StyleToken:
        """MovieLLM's style immobilization: the style's token, trained once per (model, style, settings) and then
        answered by the style library."""
        result = immobilize_style(self.scene_renderer, style)
        return StyleToken(result.token, tuple(result.vectors), str(result.path))

    def auto_batch_size(self, s: BatchSettings) -> int:
        """run.batching: on a GPU, what fits in memory capped by the model's throughput knee."""
        if self.backend.device.type != "cuda":
            return CPU_AUTO_BATCH
        return throughput_batch(self.model.kind, s.width, s.height, self._batch_fits(s))

    def _batch_fits(self, s: BatchSettings) -> int:
        free, _ = torch.cuda.mem_get_info(self.backend.device)
        # Peak activation memory of a UNet step grows ~linearly with batch; measure it once at batch 1.
        torch.cuda.reset_peak_memory_stats(self.backend.device)
        base = torch.cuda.memory_allocated(self.backend.device)
        probe = FrameJob("probe", "probe", "probe", "", 0)
        self.render([probe], replace(s, steps=1, refiner=None))
        per_sample = max(torch.cuda.max_memory_allocated(self.backend.device) - base, 1)
        return int(max(1, min(MAX_AUTO_BATCH, 0.85 * free // per_sample)))


def batch_settings(s: RenderSettings, loras: LoraSet = ()) -> BatchSettings:
    """What frames rendered together must share, from resolved render settings and the movie's LoRA set."""
    switch = s.refiner_switch if s.refiner_switch is not None else BatchSettings.refiner_switch
    return BatchSettings(width=s.width, height=s.height, steps=s.steps, guidance=s.guidance, scheduler=s.scheduler,
                         timestep_spacing=s.timestep_spacing, refiner=s.refiner, refiner_switch=switch, vae=s.vae,
                         loras=loras)
