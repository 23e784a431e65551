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


class SpyBackend:
    """Wraps a backend and hands every UNet call to `seen(latents, t, cond)` before passing it on."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype

    def seen(self, latents, t, cond) -> None:
        raise NotImplementedError

    def encode_text(self, *args):
        return self.inner.encode_text(*args)

    def set_loras(self, *args):
        return self.inner.set_loras(*args)

    def denoise(self, latents, t, cond):
        self.seen(latents, t, cond)
        return self.inner.denoise(latents, t, cond)

    def decode(self, latents):
        return self.inner.decode(latents)


def cli_json(args: list[str]) -> dict:
    """Run the CLI (in-process), require exit 0, return its last output line as JSON (`--json` summaries)."""
    from click.testing import CliRunner

    from movielm_fast.cli.main import cli

    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])
