"""A render run: plans -> batches -> files, with resume, OOM back-off and progress.

Order of work: validate every plan (no model loaded yet) -> load the model and backend -> bind style embeddings
-> list frames still to render -> render them in batches of frames that share settings -> write each batch's
files and manifests before starting the next (so Ctrl-C loses at most the batch in flight) -> storyboards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import EngineConfig
from .errors import UserError
from .paths import atomic_write_bytes, sha256_file
from .outputs import (MANIFEST_FORMAT, png_bytes, read_manifest, storyboard,
                      write_manifest)
from .pipeline import BatchSettings, FrameJob, render_batch
from .plan import LoadedMovie, load_plan
from .prompts import frame_prompt
from .seeds import frame_seed

log = logging.getLogger("movielm_fast")


@dataclass
class FrameTask:
    job: FrameJob
    settings: BatchSettings
    chunks: int
    key: dict[str, Any]  # everything that determines the pixels; a manifest entry must match it to be reused
    dialogue: str
    movie: LoadedMovie


@dataclass
class Summary:
    frames_total: int = 0
    frames_rendered: int = 0
    frames_skipped: int = 0
    seconds: float = 0.0
    render_seconds: float = 0.0
    unet_steps: int = 0
    batch_size: int = 0
    storyboards: list[str] = field(default_factory=list)
    movies: int = 0

    @property
    def images_per_second(self) -> float:
        return self.frames_rendered / self.render_seconds if self.render_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"movies": self.movies, "frames": self.frames_total, "rendered": self.frames_rendered,
                "skipped": self.frames_skipped, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 4),
                "unet_steps_per_second": round(self.unet_steps / max(self.render_seconds, 1e-9), 3),
                "batch_size": self.batch_size, "storyboards": self.storyboards}


def collect_plans(paths: list[str | Path]) -> list[LoadedMovie]:
    """Every movie of every plan file (a folder means all *.json in it), validated before anything is loaded."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"no plan files found in {', '.join(map(str, paths))}", "pass a plan.json or a folder of them")
    movies = [m for f in files for m in load_plan(f)]
    ids = [m.movie.id for m in movies]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:  # within one file the plan validation already said so; this is across files
        raise UserError(f"movie id(s) {', '.join(map(repr, duplicated))} appear in more than one plan",
                        "movie ids name output folders; make them unique across the files you render")
    for m in movies:
        if m.movie.style.embedding and not (m.plan_dir / m.movie.style.embedding).is_file():
            raise UserError(f"movie {m.movie.id!r}: style embedding {m.movie.style.embedding!r} not found "
                            f"(looked in {m.plan_dir})", "fix style.embedding; paths are relative to the plan file")
    return movies


class Renderer:
    """Holds the loaded model, backend and prompt cache; renders any number of movies."""

    def __init__(self, config: EngineConfig):
        from .backends.base import create_backend
        from .models import load_model
        from .text import PromptEncoder

        self.config = config
        config.torch_device  # fail fast on a bad device before loading gigabytes
        self.model = load_model(config.model)
        self.backend = create_backend(config.backend, self.model, config)
        self.encoder = PromptEncoder(self.model, self.backend)
        self.style_tokens: dict[str, str] = {}

    # --- planning ------------------------------------------------------------------------------------------
    def _style_token(self, lm: LoadedMovie) -> str | None:
        from .textual_inversion import load_embedding, vectors_for_model

        style = lm.movie.style
        if style.embedding:
            source = str((lm.plan_dir / style.embedding).resolve())
            token = style.token
        elif self.config.style_training:
            from .style import immobilize

            # MovieLLM's style immobilization: trained once per (model, style, settings), then a library hit.
            path, token = immobilize(self, style)
            source = str(path)  # immobilize checks encoder.token_sources against this exact string
        else:
            return None
        if source not in self.style_tokens:
            emb = load_embedding(source)
            token = token or emb.token or f"<{style.name.lower().replace(' ', '-')}>"
            self.encoder.add_token(token, vectors_for_model(emb, self.model.kind), source)
            self.style_tokens[source] = token
        return self.style_tokens[source]

    def tasks(self, movies: list[LoadedMovie], overrides=None) -> list[FrameTask]:
        """Every frame as a task; `overrides` are command-line settings (default: this renderer's config)."""
        overrides = self.config.overrides if overrides is None else overrides
        tasks = []
        for lm in movies:
            s = lm.resolved(overrides)
            token = self._style_token(lm)
            bs = BatchSettings(s.width, s.height, s.steps, s.guidance, s.scheduler)
            for frame in lm.movie.frames:
                prompt = frame_prompt(lm.movie, frame, token)
                seed = frame_seed(s.seed, frame.id, frame.seed, s.seed_mode)
                job = FrameJob(lm.movie.id, frame.id, prompt, s.negative_prompt, seed)
                key = {"prompt": prompt, "negative_prompt": s.negative_prompt, "seed": seed, "width": s.width,
                       "height": s.height, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
                       "dtype": self.config.dtype_name, "model_hash": self.model.content_hash}
                chunks = self.encoder.pair_chunks(prompt, s.negative_prompt)
                tasks.append(FrameTask(job, bs, chunks, key, frame.dialogue, lm))
        return tasks

    def auto_batch_size(self, s: BatchSettings) -> int:
        import torch

        if self.backend.device.type != "cuda":
            return 4  # CPU throughput barely grows with batch; keep the in-flight loss small
        free, _ = torch.cuda.mem_get_info(self.backend.device)
        # Peak activation memory of a UNet step grows ~linearly with batch; measure it once at batch 1.
        torch.cuda.reset_peak_memory_stats(self.backend.device)
        base = torch.cuda.memory_allocated(self.backend.device)
        probe = FrameJob("probe", "probe", "probe", "", 0)
        render_batch(self.model, self.backend, self.encoder, [probe], BatchSettings(s.width, s.height, 1, s.guidance,
                                                                                    s.scheduler))
        per_sample = max(torch.cuda.max_memory_allocated(self.backend.device) - base, 1)
        return int(max(1, min(64, 0.85 * free // per_sample)))


def _entry(task: FrameTask, file: str, sha: str, seconds: float) -> dict[str, Any]:
    return {"id": task.job.frame_id, "file": file, "dialogue": task.dialogue, **task.key, "sha256": sha,
            "seconds": round(seconds, 4)}


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "can't allocate memory" in str(exc).lower())


class MovieOutputs:
    """Output folder and manifest of one movie; the manifest is rewritten after every batch."""

    def __init__(self, config: EngineConfig, lm: LoadedMovie, renderer: Renderer):
        self.lm = lm
        self.dir = config.out / lm.movie.id
        self.manifest_path = self.dir / "manifest.json"
        old = read_manifest(self.manifest_path) or {}
        self.entries: dict[str, dict[str, Any]] = {e["id"]: e for e in old.get("frames", []) if "id" in e}
        model = renderer.model
        self.header = {"format": MANIFEST_FORMAT, "movie": lm.movie.model_dump(mode="json"),
                       "model": {"id": model.model_id, "hash": model.content_hash, "kind": model.kind},
                       "settings": {**lm.resolved(config.overrides).model_dump(),
                                    "dtype": renderer.config.dtype_name, "backend": renderer.config.backend}}

    def is_done(self, task: FrameTask) -> bool:
        entry = self.entries.get(task.job.frame_id)
        if not entry or any(entry.get(k) != v for k, v in task.key.items()):
            return False
        path = self.dir / entry["file"]
        return path.is_file() and sha256_file(path) == entry.get("sha256")

    def add(self, task: FrameTask, image, seconds: float) -> None:
        rel = f"frames/{task.job.frame_id}.png"
        meta = {"prompt": task.job.prompt, "negative_prompt": task.job.negative_prompt, "seed": str(task.job.seed),
                "model": self.header["model"]["id"], "model_hash": self.header["model"]["hash"],
                "settings": json.dumps({k: task.key[k] for k in ("width", "height", "steps", "guidance", "scheduler",
                                                                 "dtype")})}
        data = png_bytes(image, meta)
        atomic_write_bytes(self.dir / rel, data)
        self.entries[task.job.frame_id] = _entry(task, rel, hashlib.sha256(data).hexdigest(), seconds)

    def save(self) -> None:
        order = [f.id for f in self.lm.movie.frames]
        frames = [self.entries[i] for i in order if i in self.entries]
        write_manifest(self.manifest_path, {**self.header, "frames": frames})

    def complete(self) -> bool:
        return all(f.id in self.entries for f in self.lm.movie.frames)

    def write_storyboard(self) -> Path:
        frames = [(f.id, f.dialogue, self.dir / self.entries[f.id]["file"]) for f in self.lm.movie.frames]
        path = self.dir / "storyboard.png"
        atomic_write_bytes(path, storyboard(frames))
        return path


def _batches(tasks: list[FrameTask], size: int) -> list[list[FrameTask]]:
    """Frames that share settings and window count, in plan order, cut into batches of `size`."""
    groups: dict[tuple, list[FrameTask]] = {}
    for t in tasks:
        groups.setdefault((t.settings, t.chunks), []).append(t)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def render(config: EngineConfig, plan_paths: list[str | Path],
           progress: Callable[[int, int], None] | None = None, renderer: Renderer | None = None) -> Summary:
    """Render every frame of every movie; frames already rendered with identical settings are skipped."""
    t0 = time.perf_counter()
    movies = collect_plans(plan_paths)
    renderer = renderer or Renderer(config)
    outputs = {lm.movie.id: MovieOutputs(config, lm, renderer) for lm in movies}
    tasks = renderer.tasks(movies, config.overrides)
    todo = [t for t in tasks if not (config.skip_existing and outputs[t.job.movie_id].is_done(t))]
    summary = Summary(frames_total=len(tasks), frames_skipped=len(tasks) - len(todo), movies=len(movies))
    for mo in outputs.values():
        mo.save()  # drops entries of frames no longer in the plan
    size = config.batch_size
    if size == "auto":
        size = renderer.auto_batch_size(todo[0].settings) if todo else 1
    summary.batch_size = size
    if progress:
        progress(0, len(todo))
    queue = _batches(todo, size)
    while queue:
        batch = queue.pop(0)
        tb = time.perf_counter()
        try:
            images = render_batch(renderer.model, renderer.backend, renderer.encoder, [t.job for t in batch],
                                  batch[0].settings)
        except FloatingPointError as exc:
            raise UserError(f"{exc} while rendering {batch[0].job.movie_id}/{batch[0].job.frame_id}",
                            "use --dtype fp32 (or bf16); fp16 overflows in this model") from None
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if len(batch) == 1:
                raise UserError("out of memory even at batch size 1",
                                "use a smaller --width/--height, --dtype fp16, or a larger device") from None
            size = len(batch) // 2
            log.warning("out of memory at batch %d; continuing with batches of %d", len(batch), size)
            summary.batch_size = size
            # Re-cut everything still to do, so later batches do not each fail once before shrinking.
            queue = _batches([t for b in [batch, *queue] for t in b], size)
            continue
        seconds = (time.perf_counter() - tb) / len(batch)
        touched = set()
        for task, image in zip(batch, images):
            outputs[task.job.movie_id].add(task, image, seconds)
            touched.add(task.job.movie_id)
        for movie_id in touched:
            outputs[movie_id].save()
        summary.frames_rendered += len(batch)
        summary.render_seconds += time.perf_counter() - tb
        summary.unet_steps += batch[0].settings.steps  # UNet evaluations (each over the whole batch)
        if progress:
            progress(len(batch), len(todo))
    for mo in outputs.values():
        if mo.complete():
            summary.storyboards.append(str(mo.write_storyboard()))
    summary.seconds = time.perf_counter() - t0
    return summary
