"""A run's own choices: where files go, how frames are stored, what is rendered again, and how frames are batched.

What the loaded model needs is `engine.config.ModelConfig` (handed to the executor once, when the model loads);
a plan's render settings are `plan.RenderSettings`, and `overrides` here are the command line's, which win over
the plan's. Each field is declared once with `setting(...)`: the CLI's flags and what `serve` accepts per plan
are made from these declarations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from movielm_fast.plan import RenderSettings
from movielm_fast.settings import CLIENT, LOCAL_RUN, PER_PLAN, RESIDENT, Settings, positive_or_auto, setting

from .images import IMAGE_FORMATS


class RunConfig(Settings):
    out: Path = setting(Path("out"), "Output folder: OUT/<movie id>/frames, manifest.json, storyboard.png.", flag=None)
    overrides: RenderSettings = Field(default_factory=RenderSettings)
    """Render settings from the command line (--steps, --seed, ...: plan.RenderSettings' flags); they win over the
    plan's own."""
    batch_size: int | Literal["auto"] = setting(
        "auto", "Frames per batch, or 'auto' (on a GPU: the largest that fits, capped at the model's throughput "
                "knee).", served=RESIDENT)
    force: bool = setting(
        False, "Re-render frames even if they are already done.",
        served=("cannot be sent to a server: a served plan resumed after a restart must skip what it already "
                "rendered", "delete the frames to render again from the server's output, or render without --server"))
    replace: bool = setting(False, "Render over a movie of the same id from another plan in OUT (refused without "
                                   "it, so one plan never silently overwrites another's frames).", served=PER_PLAN)
    style_training: bool = setting(
        True, "Immobilize the styles that have no embedding (train one textual-inversion token each, cached in the "
              "style library) before rendering; --no-style-training writes them out as text instead.",
        flag="--style-training/--no-style-training", served=PER_PLAN)
    image_format: Literal[tuple(IMAGE_FORMATS)] = setting(  # type: ignore[valid-type]
        "png", "Frame files: png (lossless) | jpg | webp (lossy: much smaller files, much faster to encode; "
               "bench/RESULTS.md). Every format carries the prompt, seed and model in the file.",
        served=PER_PLAN)
    quality: int | None = setting(None, "JPEG/WebP quality [95 jpg, 90 webp].", ge=1, le=100, served=PER_PLAN)
    writer_threads: int = setting(2, "Threads that encode and write frame files while the next batch renders; 0 "
                                     "writes on the render thread.", flag=None, ge=0)
    quiet: bool = setting(False, "No progress display; only errors and the summary.", served=CLIENT)

    _batch_size = field_validator("batch_size", mode="before")(classmethod(lambda cls, v: positive_or_auto(v)))


CPU_CORES_PER_WORKER = 4
"""Default CPU cores (= torch threads) per worker on CPU clusters when --workers is not given."""


class ClusterOptions(Settings):
    """Where a run's batches go: this process (`cluster` None), or the workers of a Ray cluster (run/cluster.py)."""

    served = LOCAL_RUN
    cluster: Literal["ray"] | None = setting(None, "Spread the work over a Ray cluster.")
    address: str = setting("auto", "Ray address: auto (the running cluster, else a private local one) | local (a "
                                   "private one on 127.0.0.1) | ray://host:10001 (Ray Client) | host:6379.")
    workers: int | None = setting(None, "Ray workers (default: one per GPU, or one per group of "
                                        f"{CPU_CORES_PER_WORKER} CPU cores).", ge=1)
    gpus_per_worker: float = setting(1.0, "GPUs per Ray worker.", gt=0)
    cpus_per_worker: int | None = setting(None, "CPU workers only: cores and torch threads per worker; default: "
                                                "cores / workers, or CPU_CORES_PER_WORKER.", flag=None, ge=1)
    in_flight_per_worker: int = setting(2, "Batches queued at each worker, so it starts the next while the driver "
                                           "writes the previous one's files.", flag=None, ge=1)
    max_restarts: int = setting(8, "How often Ray restarts a worker whose process died.", flag=None, ge=0)
    max_task_retries: int = setting(2, "How often Ray re-runs a batch whose worker died while it was running (on the "
                                       "restarted worker); a batch that outlives this is treated as the cause and "
                                       "its movie is reported failed.", flag=None, ge=0)
    start_timeout_s: float = setting(600.0, "How long to wait for workers to be placed and load the model.",
                                     flag=None, gt=0)
    runtime_env: dict[str, Any] | None = setting(None, "Passed to the worker actors (e.g. {\"pip\": [...]} when the "
                                                       "cluster lacks movielm-fast).", flag=None)
