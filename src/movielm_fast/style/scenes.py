"""Scenes in a style, rendered by our own engine, for styles given without images; and `SceneRenderer`, what style
training needs of the run's renderer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.oom import map_halving
from movielm_fast.style.images import TrainingImage
from movielm_fast.style.training import StyleSettings

# Diverse subjects, so the token learns what the scenes share (the style) rather than any one subject.
SUBJECTS = [
    "a portrait of a woman", "a crowded city street", "a quiet room with a window", "a man walking in the rain",
    "a forest path", "two people talking at a table", "a castle on a hill", "a close-up of an old man's face",
    "a harbour with boats at dawn", "a child playing in a garden", "a grand staircase", "a mountain landscape",
    "a market square", "a dog sleeping by a fireplace", "a train station platform", "a candle-lit dinner",
]


def scene_prompt(name: str, description: str, subject: str) -> str:
    return ", ".join(p for p in (f"an image in {name} style", description, subject) if p)


@dataclass(frozen=True)
class SceneRenderer:
    """What style training needs of a loaded renderer, and nothing more: its model, its device, and a way to render
    scenes (`render(jobs, settings)` -> (H, W, 3) uint8 images). `run.renderer.Renderer.scene_renderer` makes one;
    passing this instead of the renderer keeps the style package from calling back into the renderer that uses it."""

    model: Any
    device: torch.device
    render: Callable[[list[FrameJob], BatchSettings], Sequence[np.ndarray]]


def render_scenes(renderer: SceneRenderer, name: str, description: str, s: StyleSettings) -> list[TrainingImage]:
    """N scenes in the style, with our own render path (batches shrink on out-of-memory)."""
    subjects = [SUBJECTS[i % len(SUBJECTS)] for i in range(s.scenes)]
    jobs = [FrameJob("style", f"scene-{i}", scene_prompt(name, description, subj), "", s.seed + i)
            for i, subj in enumerate(subjects)]
    bs = BatchSettings(s.resolution, s.resolution, s.scene_steps, s.scene_guidance, s.scene_scheduler)
    size = len(jobs) if renderer.device.type == "cuda" else 4
    pixels = map_halving(lambda chunk: list(renderer.render(list(chunk), bs)), jobs, size,
                         "rendering style scenes")
    res = s.resolution
    return [TrainingImage(p, subj, (res, res), (0, 0)) for p, subj in zip(pixels, subjects)]
