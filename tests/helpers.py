"""Small helpers shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_plan(path: Path, movies: list[dict], defaults: dict | None = None) -> Path:
    data = {"version": 1, "defaults": defaults or {}, "movies": movies}
    path.write_text(json.dumps(data))
    return path


def movie(movie_id: str, n_frames: int = 3, **extra) -> dict:
    m = {"id": movie_id, "title": movie_id.title(), "style": {"name": "Gothic", "description": "soft sepia"},
         "characters": [{"name": "Rosa", "appearance": "a woman in lavender"}],
         "frames": [{"id": f"{i:03d}", "description": f"Rosa in scene {i}", "dialogue": f"line {i}"}
                    for i in range(n_frames)]}
    m.update(extra)
    return m


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)
