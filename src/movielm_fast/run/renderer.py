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
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.consistency import AnchorRecord, Anchors
from movielm_fast.engine.families import family_of_spec
from movielm_fast.engine.fp8 import check_quantize
from movielm_fast.engine.frames import Frames
from movielm_fast.engine.jobs import AnchorSpec, BatchSettings, FrameJob
from movielm_fast.engine.lora import LoraLibrary, LoraSet, check_lora_file, combine, lora_ref, set_key
from movielm_fast.engine.models import (
    check_fits,
    load_model,
    load_part,
    model_defaults,
    native_size,
    size_warning,
    style_training_note,
)
from movielm_fast.engine.pipeline import Expert, render_batch
from movielm_fast.engine.seeds import SAFE_SEEDS, SEED_SCHEME, derived_seed, frame_seed
from movielm_fast.engine.step_cache import check_step_cache
from movielm_fast.errors import UserError
from movielm_fast.plan import LoadedMovie, RenderSettings, Style
from movielm_fast.style.characters import CharacterToken, character_token
from movielm_fast.style.immobilize import immobilize_style
from movielm_fast.style.scenes import SceneRenderer

from .batching import CPU_AUTO_BATCH, MAX_AUTO_BATCH, shape_cost, throughput_batch
from .prompts import frame_characters, frame_prompt, style_prefix
from .startup import timed
from .tasks import FrameTask, ModelInfo, MoviePlan, StyleToken

log = logging.getLogger("movielm_fast")


class Renderer:
    """Holds the loaded model, its backend and prompt cache (and any refiner or VAE a movie adds); renders any
    number of movies.

    `config` is handed down once: the model loads as it says, and every backend gets its backend part. `model` and
    `backend` may be passed in (tests wrap a backend, benchmarks reuse a loaded model)."""

    def __init__(self, config: ModelConfig, model=None, backend=None):
        family = model.family if model is not None else family_of_spec(config.model)
        family.check_config(config)  # fail fast on an option the model's family cannot run
        config = self._auto_dtype(config, family)
        self.config = config
        device = config.torch_device  # fail fast on a bad device, --lora file or option before loading gigabytes
        for path, _ in config.loras:
            check_lora_file(Path(path), "--lora", family)
        if device.type == "cpu" and config.dtype_name == "fp16":
            # CPUs have no fp16 matrix units PyTorch uses: every op converts (bench/RESULTS.md has the cost).
            log.warning("--dtype fp16 on the CPU is emulated and several times slower than fp32: use --dtype fp32 "
                        "(or --dtype auto); fp16 is for --device cuda")
        self.step_cache = check_step_cache(config.step_cache, config.step_cache_depth, config.backend)
        check_quantize(config.quantize, config.backend, device)
        self.startup: dict[str, float] = {}  # run.startup phases of this renderer's set-up
        self.tokens: dict[str, StyleToken] = {}  # bound so far: a refiner loaded later binds them too
        self.parts: dict[tuple[str, str], Expert] = {}  # (role, resolved folder) -> a refiner or VAE, on first use
        with timed(self.startup, "model_load"):
            # The torch backend runs the loaded modules themselves: load them as it will run them. Exporters
            # (ONNX Runtime, TensorRT) trace float32 modules on the host.
            target = (config.torch_dtype, device) if config.backend == "torch" else None
            if target and device.type == "cuda" and model is None:
                check_fits(config.model, config.torch_dtype, device, config.offload_text_encoders)
            if target and config.offload_text_encoders:  # the text encoders load into host memory and wait there
                target += (torch.device("cpu"),)
            self.model = model or load_model(config.model, target=target)
        self.startup.update(self.model.load_seconds if model is None else {})
        with timed(self.startup, "backend_setup"):
            self.base = self._expert(self.model, backend)
        self.backend, self.encoder = self.base.backend, self.base.encoder
        self.loras = LoraLibrary(self.model)  # each LoRA file read once, for planning and merging
        self.times: dict[str, float] = {}  # host seconds per pipeline stage, over every batch rendered here
        self.anchor_records: OrderedDict[str, AnchorRecord] = OrderedDict()
        self.characters: dict[str, CharacterToken] = {}  # anchor key -> the character's learned token
        self.defaults = model_defaults(self.model)
        self._warned: set[str] = set()  # settings warnings already shown (each once per run)
        self.on_step: Callable[[int, int], None] | None = None  # (done, steps) of the batch rendering now

    @staticmethod
    def _auto_dtype(config: ModelConfig, family) -> ModelConfig:
        """--dtype auto on CUDA is fp16 unless the model's family runs in another dtype there (the transformer
        families overflow in fp16: bf16), which is then said."""
        if config.dtype != "auto" or config.torch_device.type != "cuda" or family.cuda_dtype == "fp16":
            return config
        log.info("--dtype auto: %s for %s (it overflows in fp16)", family.cuda_dtype, family.name)
        return config.model_copy(update={"dtype": family.cuda_dtype})

    @property
    def info(self) -> ModelInfo:
        c = self.config
        lossy = {"quantize": c.quantize} if c.quantize else {}
        if self.step_cache:
            lossy["step_cache"] = self.step_cache.key()
        return ModelInfo(self.model.model_id, self.model.content_hash, self.model.kind, c.dtype_name, c.backend,
                         self.defaults, style_training_note(self.model), lossy, shape_cost(c))

    def _expert(self, bundle, backend=None) -> Expert:
        """One way to make a loaded bundle (the model, a refiner, a VAE) renderable: its backend, made from this
        config's backend part, and a prompt encoder that knows the bound style tokens if it has text encoders."""
        backend = backend or create_backend(self.config.backend, bundle, self.config.backend_config)
        expert = Expert(bundle, backend, bundle.family.prompt_encoder(bundle, backend) if bundle.text_encoders
                        else None)
        self._bind(expert, self.tokens.values())
        return expert

    @staticmethod
    def _bind(expert: Expert, tokens) -> None:
        """A token carries one vector set per text encoder of the model it was learned for; a part with fewer
        encoders (the SDXL refiner has only SDXL's second) binds the last ones."""
        n = len(expert.model.text_encoders)
        for t in tokens if n else ():
            expert.encoder.add_token(t.token, list(t.vectors[-n:]), t.source)

    def bind(self, tokens: list[StyleToken]) -> None:
        """Make the style tokens known to every prompt encoder (already bound ones are skipped)."""
        for expert in [self.base, *self.parts.values()]:
            self._bind(expert, tokens)
        self.tokens.update((t.token, t) for t in tokens)

    def _part(self, role: str, path: str) -> Expert:
        """The refiner or VAE (`role`) in `path`: loaded, checked against the model and made renderable, once."""
        if (role, path) not in self.parts:
            self.parts[role, path] = self._expert(load_part(role, path, self.model))
        return self.parts[role, path]

    def anchor_specs(self, lm: LoadedMovie, token: str | None, s: RenderSettings, bs: BatchSettings,
                     seed_scheme: int = SEED_SCHEME) -> dict[str, AnchorSpec]:
        """Character name -> its anchor (consistency mode), or {} when the movie's mode is off. `s`: the movie's
        resolved settings; `bs`: its batch settings (an anchor renders with those of the frames that use it, at
        character_token's anchor_steps)."""
        cons = s.consistency
        if self.config.consistency is not None:
            cons = cons.model_copy(update={"mode": self.config.consistency})
        if cons.mode == "none" or not lm.movie.characters:
            return {}
        if self.step_cache:
            raise UserError(f"movie {lm.movie.id!r}: consistency mode cannot run with --step-cache (anchor attention "
                            "records and reads every attention layer at every step; cached steps skip the deep ones)",
                            "drop --step-cache, or render this movie with --consistency none")
        prefix = style_prefix(lm.movie, token)
        if cons.mode == "character_token":  # rendered once per character: more steps than a frame (plan.py)
            bs = replace(bs, steps=cons.anchor_steps or 2 * bs.steps)

        def anchor(c) -> AnchorSpec:
            before, after = (x.replace("{", "{{").replace("}", "}}")
                             for x in (prefix + cons.anchor_prompt).split("{appearance}"))
            caption = before + "{} " + c.appearance.replace("{", "{{").replace("}", "}}") + after
            return AnchorSpec(lm.movie.id, c.name, prefix + cons.anchor_prompt.replace("{appearance}", c.appearance),
                              s.negative_prompt, derived_seed(seed_scheme, s.seed, lm.movie.id, "anchor", c.name), bs,
                              cons, self.model.content_hash, c.appearance, caption)

        return {c.name: anchor(c) for c in lm.movie.characters}

    def lora_set(self, lm: LoadedMovie) -> LoraSet:
        """The movie's LoRA set: --lora ones, then its style's, then its own (engine.lora.combine), each checked
        against the model (a LoRA for another model is a UserError naming it)."""
        named = [("--lora", p, s) for p, s in self.config.loras] + \
                [(f"movie {lm.movie.id!r} {where}", p, s) for where, p, s in lm.lora_files()]
        for what, path, scale in named:
            self.loras.layers(lora_ref(path, scale), f"{what} LoRA")
        return combine([(path, scale) for _, path, scale in named])

    def plan(self, lm: LoadedMovie, token: str | None, overrides: RenderSettings,
             seed_scheme: int = SEED_SCHEME) -> MoviePlan:
        """One movie on this model: every frame as a task, and the settings its manifest records. `token`: the
        movie's bound style token, if any; `overrides`: the run's command-line settings; `seed_scheme`: how frames
        without a seed get one (engine.seeds; the one its manifest records, for a movie that resumes)."""
        s = lm.confined_folders(self.info.resolved(lm, overrides))  # a refiner or VAE folder: checked as it loads
        self._check_size(s)
        for warning in self.model.family.check(self.model, s):  # errors for what it cannot render, raised here
            self._warn_once(warning)
        loras = self.lora_set(lm)
        bs = replace(batch_settings(s, loras), step_cache=self.step_cache)
        extra = self._expert_key(bs)  # a bad refiner or VAE fails the movie here, before any of its frames
        anchors = self.anchor_specs(lm, token, s, bs, seed_scheme)
        learned = {}
        if anchors and next(iter(anchors.values())).consistency.mode == "character_token":
            learned = {name: self._character(spec) for name, spec in anchors.items()}
        names = {n: c.token for n, c in learned.items()} or None
        lossy = self.info.lossy
        tasks = []
        for frame in lm.movie.frames:
            prompt = frame_prompt(lm.movie, frame, token, names)
            seed = frame_seed(s.seed, lm.movie.id, frame.id, frame.seed, s.seed_mode, seed_scheme)
            own = tuple(anchors[name] for name in frame_characters(lm.movie, frame)) if anchors else ()
            job = FrameJob(lm.movie.id, frame.id, prompt, s.negative_prompt, seed, () if learned else own)
            key = {"prompt": prompt, "negative_prompt": s.negative_prompt, "seed": seed, "width": s.width,
                   "height": s.height, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
                   "dtype": self.config.dtype_name, "model_hash": self.model.content_hash, **extra}
            if bs.true_cfg > 1:  # frames without it keep the key they always had
                key["true_cfg"] = bs.true_cfg
            if loras:  # frames without LoRAs keep the key they always had, so earlier outputs still resume
                key["loras"] = set_key(loras)
            key.update(lossy)  # lossy speed-ups change the pixels; frames rendered without them keep their keys
            if own:  # frames without characters render exactly as without the mode: their key stays the same
                key["consistency"] = {**own[0].consistency.model_dump(), "anchors": [a.key for a in own]}
            tasks.append(FrameTask(job, bs, self.encoder.pair_chunks(prompt, s.negative_prompt), key, frame.dialogue))
        unsafe = [t.job for t in tasks if t.job.seed >= SAFE_SEEDS]
        if unsafe and seed_scheme > 1:  # (scheme 1 derived them so: a movie that resumes keeps them)
            log.warning("movie %r: frame %s has seed %d, above 2^53 - 1: A1111's web UI, ComfyUI and Civitai round "
                        "it (JavaScript numbers), so they cannot reproduce it; use seeds below %d", lm.movie.id,
                        unsafe[0].frame_id, unsafe[0].seed, SAFE_SEEDS)
        # Unset true_cfg is left out: the manifests of models without it stay as they were.
        settings = {**s.model_dump(exclude=set() if s.true_cfg else {"true_cfg"}), "dtype": self.config.dtype_name,
                    "backend": self.config.backend, "seed_scheme": seed_scheme}
        if loras:
            settings["loras"] = set_key(loras)
        return MoviePlan(tasks, {**settings, **lossy}, [StyleToken(c.token, c.vectors, c.source)
                                                        for c in learned.values()],
                         [(c.spec, c.image) for c in learned.values()])

    def _character(self, spec: AnchorSpec) -> CharacterToken:
        """The character's learned token (style.characters: from the library, or trained now), bound here."""
        if spec.key not in self.characters:
            self.characters[spec.key] = character_token(self.scene_renderer, spec)
        c = self.characters[spec.key]
        self.bind([StyleToken(c.token, c.vectors, c.source)])
        return c

    def _check_size(self, s: RenderSettings) -> None:
        """Warn once per size that is far from the model's native one (given by the plan or a flag: the model's own
        default never is)."""
        warning = size_warning(s.width, s.height, native_size(self.model))
        if warning:
            self._warn_once(warning)

    def _warn_once(self, warning: str) -> None:
        if warning not in self._warned:
            self._warned.add(warning)
            log.warning(warning)

    def _expert_key(self, bs: BatchSettings) -> dict[str, Any]:
        """What the few-step, refiner and VAE settings add to a frame's key (nothing when unused, so the keys of
        earlier renders stay the same and they resume)."""
        extra: dict[str, Any] = {}
        if bs.timestep_spacing:
            extra["timestep_spacing"] = bs.timestep_spacing
        if bs.refiner:
            extra["refiner"] = {"id": Path(bs.refiner).name, "hash": self._part("refiner", bs.refiner).model.content_hash,
                                "switch": bs.refiner_switch}
        if bs.vae:
            extra["vae"] = {"id": Path(bs.vae).name, "hash": self._part("vae", bs.vae).model.content_hash}
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
        """(refiner, decoder backend) for a batch with settings `s`."""
        return (self._part("refiner", s.refiner) if s.refiner else None), \
            (self._part("vae", s.vae).backend if s.vae else None)

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
                         loras=loras, true_cfg=s.true_cfg or 1.0)
