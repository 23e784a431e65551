"""Executors: where batches run. The driver (run.driver) sees only this small interface, so a local run and a
Ray run are the same loop.

    info                    the loaded model (manifests, resume keys)
    train_style(style)      -> StyleToken          (raises UserError)
    plan(items, overrides)  -> per movie: MoviePlan (its tasks and manifest settings) or a failure reason
    batch_size(settings)    -> int                 ("auto" batch size)
    has_room()              whether another batch may be submitted now
    submit(batch)           start a batch
    next_result()           -> (batch, Rendered | Failed), the next finished batch, any order
    pending                 batches submitted and not yet returned
    worker_stats()          per-worker figures for the summary ([] locally)
    cancel()                drop what was submitted and has not come back (after an interrupt)

A batch that raised comes back as `Failed` (never as an exception): the driver decides what it means (out of
memory: re-cut the queue; anything else: isolate the movie). KeyboardInterrupt always propagates.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings
from movielm_fast.engine.oom import is_oom
from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings, Style

from .config import ClusterOptions
from .images import encode_image
from .renderer import Renderer
from .tasks import Batch, Failed, ModelInfo, MoviePlan, PlanItem, Rendered, StyleToken

log = logging.getLogger("movielm_fast")


class Executor(Protocol):
    info: ModelInfo

    def train_style(self, style: Style) -> StyleToken: ...

    def plan(self, items: list[PlanItem], overrides: RenderSettings) -> list[MoviePlan | str]: ...

    def batch_size(self, settings: BatchSettings) -> int: ...

    def has_room(self) -> bool: ...

    def submit(self, batch: Batch) -> None: ...

    def next_result(self) -> tuple[Batch, Rendered | Failed]: ...

    @property
    def pending(self) -> int: ...

    def worker_stats(self) -> list[dict[str, Any]]: ...

    def cancel(self) -> None: ...


def reason(exc: BaseException, dtype: str | None = None) -> str:
    """One line for the summary. `dtype`: the run's (ModelInfo.dtype), so an overflow's fix fits it."""
    if isinstance(exc, FloatingPointError):
        if dtype == "fp32":  # fp32 is not the fix: say what to look at
            return (f"{exc} in an fp32 run; fix: check the plan's emphasis weights ((word:1.3) is strong) and the "
                    "model's weights (a damaged checkpoint decodes to NaN)")
        return f"{exc}; fix: use --dtype fp32 (or bf16): {dtype or 'fp16'} overflows in this model"
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def plan_movies(renderer: Renderer, items: list[PlanItem], overrides: RenderSettings) -> list[MoviePlan | str]:
    """Bind each movie's style token and plan its frames; a movie whose input is bad fails alone."""
    out: list[MoviePlan | str] = []
    for lm, token, seed_scheme in items:
        try:
            if token is not None:
                renderer.bind([token])
            out.append(renderer.plan(lm, token.token if token else None, overrides, seed_scheme))
        except Exception as exc:
            out.append(reason(exc))
    return out


def run_batch(renderer: Renderer, batch: Batch, encode: bool) -> Rendered | Failed:
    """Render one batch on `renderer` (binding its tokens first: a restarted worker has none) -> a typed result."""
    t0 = time.perf_counter()
    lora0, prompt0 = renderer.times.get("lora", 0.0), renderer.times.get("prompt", 0.0)
    try:
        renderer.bind(batch.tokens)
        images, anchors = renderer.render([t.job for t in batch.tasks], batch.settings, batch.want_anchors)
        encoded = None
        if encode:
            encoded = [encode_image(image, t, renderer.info, *batch.encoding) for t, image in zip(batch.tasks, images)]
            images = None
    except Exception as exc:
        if is_oom(exc):
            return Failed(reason(exc), oom=True)
        log.debug("batch failed", exc_info=True)
        return Failed(reason(exc, renderer.info.dtype))
    return Rendered(images, encoded, time.perf_counter() - t0, anchors, renderer.times.get("lora", 0.0) - lora0,
                    renderer.times.get("prompt", 0.0) - prompt0)


class LocalExecutor:
    """Renders in this process, one batch at a time, when the driver asks for the result. The driver's writer
    threads encode and write the previous batch's files meanwhile."""

    def __init__(self, config: ModelConfig | None = None, renderer: Renderer | None = None,
                 on_step: Callable[[int, int], None] | None = None):
        self.renderer = renderer or Renderer(config)
        if on_step is not None:  # per-step progress of the batch in flight (a Ray run reports whole batches)
            self.renderer.on_step = on_step
        self.info = self.renderer.info
        self.startup = self.renderer.startup  # run.startup phases of the model load (the driver takes them)
        self._queue: deque[Batch] = deque()

    def train_style(self, style: Style) -> StyleToken:
        return self.renderer.train_style(style)

    def plan(self, items: list[PlanItem], overrides: RenderSettings) -> list[MoviePlan | str]:
        return plan_movies(self.renderer, items, overrides)

    def batch_size(self, settings: BatchSettings) -> int:
        return self.renderer.auto_batch_size(settings)

    def has_room(self) -> bool:
        return not self._queue  # rendering is synchronous: queueing more would only delay OOM re-cuts

    def submit(self, batch: Batch) -> None:
        self._queue.append(batch)

    def next_result(self) -> tuple[Batch, Rendered | Failed]:
        batch = self._queue.popleft()
        return batch, run_batch(self.renderer, batch, encode=False)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def worker_stats(self) -> list[dict[str, Any]]:
        return []

    def cancel(self) -> None:
        self._queue.clear()


@contextmanager
def open_executor(model: ModelConfig, cluster: ClusterOptions | None = None,
                  on_step: Callable[[int, int], None] | None = None) -> Iterator[Executor]:
    """The executor of a run, for every way of running: the model loads once, in this process or once per Ray
    worker (`cluster.cluster == "ray"`: run/cluster.py, which imports Ray); closed (workers stopped) on exit.
    `on_step`: per-step progress of the batch in flight (local runs; a Ray run reports whole batches)."""
    if cluster is None or cluster.cluster is None:
        yield LocalExecutor(model, on_step=on_step)
        return
    from .cluster import RayExecutor  # Ray is optional (the [cluster] extra): only Ray runs import it

    with RayExecutor(model, cluster) as executor:
        yield executor
