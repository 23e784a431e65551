"""The render core's value types: what a batch of frames is made of.

`FrameJob` is one frame (prompt, seed, the character anchors it attends to), `BatchSettings` what frames rendered
together share, `AnchorSpec` what determines a character's anchor render. They live apart from the modules that do
the work, so naming a type never imports a worker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING

from movielm_fast.plan import ConsistencySettings

if TYPE_CHECKING:
    from .lora import LoraSet
    from .step_cache import StepCache


@dataclass(frozen=True)
class BatchSettings:
    """What frames in one batch must share."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    timestep_spacing: str | None = None  # None: as the model's scheduler config says
    refiner: str | None = None  # SDXL refiner folder (resolved path); None: the base model denoises to the end
    refiner_switch: float = 0.8  # fraction of the schedule the base denoises (diffusers' denoising_end)
    vae: str | None = None  # VAE folder that decodes instead of the model's own (resolved path)
    loras: LoraSet = ()  # the LoRA set merged into the weights (engine.lora): one set per batch
    step_cache: StepCache | None = None  # DeepCache-style step caching (engine.step_cache; lossy); None: off
    true_cfg: float = 1.0  # FLUX.1's true classifier-free guidance scale; 1: off (engine.families.flux)

    def key(self) -> tuple:
        """These settings as a tuple for digests (an anchor's key), trailing defaults left out: an anchor keyed
        before a field existed keeps its key, so its earlier renders still resume."""
        values = list(astuple(self))
        defaults = [f.default for f in fields(self)]
        while values and values[-1] == defaults[len(values) - 1]:
            values.pop()
        return tuple(values)


@dataclass
class FrameJob:
    movie_id: str
    frame_id: str
    prompt: str
    negative_prompt: str
    seed: int
    anchors: tuple[AnchorSpec, ...] = ()  # the characters whose anchors it attends to (consistency mode)


@dataclass(frozen=True)
class AnchorSpec:
    """What determines one character's anchor render and record; `key` is its digest."""

    movie_id: str
    character: str
    prompt: str
    negative_prompt: str
    seed: int
    settings: BatchSettings  # what the anchor renders with (its frames' settings; character_token: its steps)
    consistency: ConsistencySettings
    model_hash: str
    appearance: str = ""  # the character's appearance, as its frames say it
    caption: str = ""  # the anchor's prompt with "{}" where the character's token goes (its training caption)

    @property
    def key(self) -> str:
        src = {"prompt": self.prompt, "negative": self.negative_prompt, "seed": self.seed,
               "settings": list(self.settings.key()), "consistency": self.consistency.model_dump(),
               "model": self.model_hash}
        return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]
