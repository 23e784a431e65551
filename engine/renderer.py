"""What a worker holds: the loaded model, its backend and the prompt encoder -- and what it does with them.

One `Renderer` lives in the local process (local runs) or in each Ray worker. The driver (engine.driver) talks to it
only through an executor; every method here does one thing: bind style tokens, plan frames, render a batch, train
a style, measure a batch size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch

from .backends.base import create_backend
from .config import EngineConfig
from .consistency import AnchorRecord, Anchors, AnchorSpec, anchor_seed
from .lora import LoraLibrary, LoraSet, combine, lora_ref, set_key
from .models import load_model
from .pipeline import BatchSettings, FrameJob, render_batch
from .plan import LoadedMovie, RenderSettings, Style
from .prompts import frame_characters, frame_prompt, style_prefix
from .seeds import frame_seed
from .style import immobilize_style
from .text import PromptEncoder


@dataclass(frozen=True)
class ModelInfo:
    """What manifests and resume keys record about the loaded model."""

    model_id: str
    content_hash: str
    kind: str
    dtype: str
    backend: str


@dataclass(frozen=True)
class StyleToken:
    """A style's learned token, in memory: one (n, D_i) tensor per text encoder. `source` names where the vectors
    came from (an embedding file or a style-library entry); binding the same source twice is a no-op."""

    token: str
    vectors: tuple[torch.Tensor, ...]
    source: str


@dataclass
class FrameTask:
    job: FrameJob
    settings: BatchSettings
    chunks: int
    key: dict[str, Any]  # everything that determines the pixels; a manifest entry must match it to be reused
    dialogue: str


class Renderer:
    """Holds the loaded model, backend and prompt cache; renders any number of movies.

    `model` and `backend` may be passed in (tests wrap a backend, benchmarks reuse a loaded model); by default
    they are loaded from `config`."""

    def __init__(self, config: EngineConfig, model=None, backend=None):
        self.config = config
        config.torch_device  # fail fast on a bad device before loading gigabytes
        self.model = model or load_model(config.model)
        self.backend = backend or create_backend(config.backend, self.model, config)
        self.encoder = PromptEncoder(self.model, self.backend)
        self.loras = LoraLibrary(self.model)  # each LoRA file read once, for planning and merging
        self.times: dict[str, float] = {}  # host seconds per pipeline stage, over every batch rendered here
        self.anchor_records: OrderedDict[str, AnchorRecord] = OrderedDict()

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model.model_id, self.model.content_hash, self.model.kind, self.config.dtype_name,
                         self.config.backend)

    def bind(self, tokens: list[StyleToken]) -> None:
        """Make the style tokens known to the prompt encoder (already bound ones are skipped)."""
        for t in tokens:
            self.encoder.add_token(t.token, list(t.vectors), t.source)

    def anchor_specs(self, lm: LoadedMovie, token: str | None, overrides: RenderSettings) -> dict[str, AnchorSpec]:
        """Character name -> its anchor (consistency mode), or {} when the movie's mode is off."""
        s = lm.resolved(overrides)
        cons = s.consistency
        if self.config.consistency is not None:
            cons = cons.model_copy(update={"mode": self.config.consistency})
        if cons.mode == "none":
            return {}
        loras = self.lora_set(lm)
        # Without LoRAs the tuple (so the anchor key) stays what it was before LoRAs existed.
        bs = astuple(BatchSettings(s.width, s.height, s.steps, s.guidance, s.scheduler))[:5] + \
            ((loras,) if loras else ())
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
        s = lm.resolved(overrides)
        loras = self.lora_set(lm)
        bs = BatchSettings(s.width, s.height, s.steps, s.guidance, s.scheduler, loras)
        anchors = self.anchor_specs(lm, token, overrides)
        tasks = []
        for frame in lm.movie.frames:
            prompt = frame_prompt(lm.movie, frame, token)
            seed = frame_seed(s.seed, frame.id, frame.seed, s.seed_mode)
            own = tuple(anchors[name] for name in frame_characters(lm.movie, frame)) if anchors else ()
            job = FrameJob(lm.movie.id, frame.id, prompt, s.negative_prompt, seed, own)
            key = {"prompt": prompt, "negative_prompt": s.negative_prompt, "seed": seed, "width": s.width,
                   "height": s.height, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
                   "dtype": self.config.dtype_name, "model_hash": self.model.content_hash}
            if loras:  # frames without LoRAs keep the key they always had, so earlier outputs still resume
                key["loras"] = set_key(loras)
            if own:  # frames without characters render exactly as without the mode: their key stays the same
                key["consistency"] = {**own[0].consistency.model_dump(), "anchors": [a.key for a in own]}
            tasks.append(FrameTask(job, bs, self.encoder.pair_chunks(prompt, s.negative_prompt), key, frame.dialogue))
        return tasks

    def render(self, jobs: list[FrameJob], settings: BatchSettings, want_anchors: frozenset[str] = frozenset()
               ) -> tuple[np.ndarray, list[tuple[AnchorSpec, np.ndarray]]]:
        """(B, H, W, 3) uint8 images, and (spec, image) of the anchors named in `want_anchors` that these frames
        use (the driver asks for those it has not saved yet)."""
        per_job = [[self._anchor(spec) for spec in job.anchors] for job in jobs]
        specs = {spec.key: spec for job in jobs for spec in job.anchors}
        anchors = Anchors(next(iter(specs.values())).consistency, per_job=per_job) if specs else None
        images = render_batch(self.model, self.backend, self.encoder, jobs, settings, self.times, anchors,
                              self.loras)
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
        record.image = render_batch(self.model, self.backend, self.encoder, [job], BatchSettings(*spec.settings),
                                    self.times, Anchors(spec.consistency, record=record), self.loras)[0]
        self.anchor_records[key] = record
        budget = self.config.anchor_cache_mb * 2**20
        while len(self.anchor_records) > 1 and sum(r.nbytes for r in self.anchor_records.values()) > budget:
            self.anchor_records.popitem(last=False)
        return record

    def train_style(self, style: Style) -> StyleToken:
        """MovieLLM's style immobilization: the style's token, trained once per (model, style, settings) and then
        answered by the style library."""
        result = immobilize_style(self, style)
        return StyleToken(result.token, tuple(result.vectors), str(result.path))

    def auto_batch_size(self, s: BatchSettings) -> int:
        if self.backend.device.type != "cuda":
            return 4  # CPU throughput barely grows with batch; keep the in-flight loss small
        free, _ = torch.cuda.mem_get_info(self.backend.device)
        # Peak activation memory of a UNet step grows ~linearly with batch; measure it once at batch 1.
        torch.cuda.reset_peak_memory_stats(self.backend.device)
        base = torch.cuda.memory_allocated(self.backend.device)
        probe = FrameJob("probe", "probe", "probe", "", 0)
        self.render([probe], BatchSettings(s.width, s.height, 1, s.guidance, s.scheduler))
        per_sample = max(torch.cuda.max_memory_allocated(self.backend.device) - base, 1)
        return int(max(1, min(64, 0.85 * free // per_sample)))
