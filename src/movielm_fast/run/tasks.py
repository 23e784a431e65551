"""The run's value types: a frame's task (its job, batch settings and resume key), a batch of them with the style
tokens their prompts use, what comes back from an executor, and what is recorded about the loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from movielm_fast.engine.jobs import AnchorSpec, BatchSettings, FrameJob
from movielm_fast.plan import LoadedMovie, RenderSettings

if TYPE_CHECKING:
    import numpy as np
    import torch

    from movielm_fast.engine.frames import Frames


@dataclass(frozen=True)
class ModelInfo:
    """What manifests and resume keys record about the loaded model."""

    model_id: str
    content_hash: str
    kind: str
    dtype: str
    backend: str
    defaults: dict[str, Any] = field(default_factory=dict, compare=False)
    """The model's own render defaults (engine.models.model_defaults): native size, its steps and guidance."""
    no_style_training: str | None = None
    """Why style training cannot help this model (engine.models.style_training_note); None: it can."""
    lossy: dict[str, Any] = field(default_factory=dict, compare=False)
    """The lossy speed-ups the model runs with (--quantize, --step-cache): what frame keys and manifests record."""
    shape_cost: bool = field(default=False, compare=False)
    """Whether a batch of a new size costs a CUDA graph capture or a compile (run.batching.shape_cost)."""

    def resolved(self, lm: LoadedMovie, overrides: RenderSettings | None) -> RenderSettings:
        """A movie's settings on this model: command line > plan > the model's defaults > built-ins."""
        return lm.resolved(overrides, RenderSettings(**self.defaults))


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


@dataclass
class MoviePlan:
    """One movie planned on the loaded model: its frames' tasks, and the settings its manifest records."""

    tasks: list[FrameTask]
    settings: dict[str, Any]
    tokens: list[StyleToken] = field(default_factory=list)  # the characters' own tokens (consistency mode)
    anchors: list[tuple[AnchorSpec, np.ndarray]] = field(default_factory=list)  # their anchors' images


@dataclass
class Batch:
    """Frames that share settings and window count, with the style tokens their prompts use."""

    tasks: list[FrameTask]
    tokens: list[StyleToken]
    encoding: tuple[str, int | None] = ("png", None)  # (image format, quality) for workers that encode frames
    want_anchors: frozenset[str] = frozenset()  # anchors whose images the driver has not saved yet

    @property
    def settings(self) -> BatchSettings:
        return self.tasks[0].settings


@dataclass
class Rendered:
    """A finished batch: its frames' images (engine.frames, read by the writer threads), or the frame files already
    encoded by the worker."""

    images: Frames | None
    encoded: list[bytes] | None
    seconds: float
    anchors: list[tuple[AnchorSpec, np.ndarray]] = field(default_factory=list)  # anchors rendered for it
    lora_seconds: float = 0.0  # of `seconds`: merging its LoRA set into the weights (0 when the set was in place)
    prompt_seconds: float = 0.0  # of `seconds`: encoding its prompts (run.startup reports the first batch's)


@dataclass
class Failed:
    reason: str
    oom: bool = False


PlanItem = tuple[LoadedMovie, StyleToken | None, int]
"""A movie to plan: the movie, its style token (None: its style is written out as text), its seed scheme."""
