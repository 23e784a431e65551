"""Rendering on a Ray cluster: the same files, manifests and pixels as `engine.runner.render`, spread over workers.

Ray is imported here and nowhere else; it is the optional extra ``movielm-fast[cluster]``.

How a job runs (the driver is the process that called `render_on_ray`):

1. The driver validates every plan (`collect_plans`) before anything starts, connects to Ray and starts long-lived
   workers: one Ray actor per GPU (or per group of CPU cores), each loading the model once into a `Renderer`.
2. Style embeddings are read by the driver and put into Ray's object store once; a worker writes the bytes to a
   local, content-addressed file before binding the token, so workers need no access to the plan folders.
   Styles that need immobilization are trained once for the whole cluster at one call site
   (`_immobilize_styles`) before any frame is planned.
3. Workers turn movies into frame tasks with `Renderer.tasks` (the prompts, seeds and manifest keys of a local
   run); a movie whose input is bad (e.g. an unreadable embedding) is reported failed, the others go on.
4. The driver applies the local resume rule (`MovieOutputs.is_done`), cuts the remaining frames into batches with
   the local grouping rule (`runner._batches`) and keeps every worker busy with up to `in_flight_per_worker`
   batches. Images come back through the object store as uint8 arrays and **the driver** writes every file and
   manifest (atomically, after each batch), so no shared filesystem is needed and an interrupted job resumes.
5. A batch whose worker died (process killed, node lost) goes back to the front of the queue and is rendered by
   the next free worker; the dead actor is restarted by Ray (`max_restarts`) and rejoins once its model is
   loaded. Ray's own task retries are off (`max_task_retries=0`) so a batch is never in two places at once: the
   driver writes each frame exactly once.

Outputs go to `config.out` on the driver's machine. Workers need the model at the same path (or "demo") and
movielm-fast installed (or pass `ClusterOptions.runtime_env`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from .config import EngineConfig
from .errors import UserError
from .paths import atomic_write_bytes
from .pipeline import BatchSettings, FrameJob
from .plan import LoadedMovie
from .runner import FrameTask, MovieOutputs, Summary, _batches, _is_oom, collect_plans

log = logging.getLogger("movielm_fast")

CPU_CORES_PER_WORKER = 4
"""Default CPU cores (= torch threads) per worker on CPU clusters when --workers is not given."""

# Ray reads this when it is imported: "0" makes a local instance use the loopback address for every server it
# starts (GCS, raylet, object manager, workers) instead of the machine's network address. A private local
# cluster must not be reachable from the network.
_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class ClusterOptions:
    address: str = "auto"
    """"auto": the running cluster (RAY_ADDRESS or the one `ray start` recorded), else a private local one;
    "local": always a private local one (bound to 127.0.0.1); "ray://host:10001" (Ray Client, needs
    ``ray[client]``) or "host:6379" for a remote cluster."""
    workers: int | None = None
    """Number of workers; default: one per GPU (device cuda), or one per `CPU_CORES_PER_WORKER` cores."""
    gpus_per_worker: float = 1.0
    cpus_per_worker: int | None = None
    """CPU workers only: cores and torch threads per worker; default: cores / workers, or CPU_CORES_PER_WORKER."""
    in_flight_per_worker: int = 2
    """Batches queued at each worker, so it starts the next while the driver writes the previous one's files."""
    max_restarts: int = 3
    """How often Ray restarts a worker whose process died (its batches go to other workers meanwhile)."""
    start_timeout_s: float = 600.0
    """How long to wait for workers to be placed and load the model."""
    runtime_env: dict[str, Any] | None = None
    """Passed to the worker actors (e.g. {"pip": [...]} when the cluster lacks movielm-fast)."""
    on_worker_ready: Callable[[dict[str, Any]], None] | None = None
    """Called on the driver whenever a worker has loaded its model (again after a restart) with its
    index, pid, node and load_seconds -- for logs and tests."""


@dataclass
class ClusterSummary(Summary):
    """`runner.Summary` plus what only a cluster run has: failures, per-worker figures, scheduling cost."""

    failures: list[dict[str, Any]] = field(default_factory=list)
    frames_failed: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    resubmitted_batches: int = 0
    startup_seconds: float = 0.0

    @property
    def idle_seconds_per_frame(self) -> float:
        """Worker time not spent rendering, per rendered frame: scheduling, transfers, file writing the workers
        waited for, and the tail where some workers had nothing left to do."""
        if not self.frames_rendered:
            return 0.0
        busy = sum(w["busy_seconds"] for w in self.workers)
        return max(0.0, len(self.workers) * self.render_seconds - busy) / self.frames_rendered

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "failed": self.frames_failed, "failures": self.failures,
                "workers": self.workers, "resubmitted_batches": self.resubmitted_batches,
                "startup_seconds": round(self.startup_seconds, 3),
                "idle_seconds_per_frame": round(self.idle_seconds_per_frame, 4)}


@dataclass(frozen=True)
class StyleBlob:
    """An embedding file's bytes in the object store; workers keep a local copy named by its hash."""

    sha256: str
    suffix: str
    ref: Any  # ray.ObjectRef of the bytes


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


# --- the worker ----------------------------------------------------------------------------------------------

class RenderWorker:
    """One long-lived Ray actor: loads the model once, then renders batch after batch.

    Never raises from its methods for input problems: errors come back as data, so the driver can tell a bad
    movie (report it, go on) from a dead worker (Ray raises RayActorError; resubmit elsewhere)."""

    def __init__(self, config: EngineConfig, threads: int | None):
        import torch

        t0 = time.perf_counter()
        self.error: dict[str, str] | None = None
        self.renderer = None
        if threads:
            torch.set_num_threads(threads)  # one worker per core group: its threads must not oversubscribe
        self._style_dir = Path(tempfile.gettempdir()) / f"movielm-fast-styles-{os.getuid()}"
        self._bound: set[str] = set()
        try:
            from .runner import Renderer

            self.renderer = Renderer(config)
        except Exception as exc:  # reported through info(); the driver decides what it means
            oom = _is_oom(exc) or "out of memory" in str(exc).lower()  # loaders wrap OOM into a UserError
            self.error = {"kind": "oom" if oom else "load", "message": _reason(exc),
                          "hint": getattr(exc, "hint", None) or ""}
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        import ray
        import torch

        r = self.renderer
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "load_seconds": self.load_seconds,
                "error": self.error, "threads": torch.get_num_threads(),
                "model": None if r is None else {"model_id": r.model.model_id, "content_hash": r.model.content_hash,
                                                 "kind": r.model.kind},
                "dtype": None if r is None else r.config.dtype_name}

    def _local_movie(self, lm: LoadedMovie, blob: StyleBlob) -> LoadedMovie:
        """`lm` with its style embedding pointing at this machine's copy of the driver's file."""
        import ray

        path = self._style_dir / f"{blob.sha256}{blob.suffix}"
        if not path.is_file():
            self._style_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(path, ray.get(blob.ref))
        style = lm.movie.style.model_copy(update={"embedding": path.name})
        movie = lm.movie.model_copy(update={"style": style})
        return lm.model_copy(update={"movie": movie, "plan_dir": self._style_dir})

    def plan(self, items: list[tuple[LoadedMovie, StyleBlob | None]], overrides) -> list[tuple[str, Any]]:
        """Per movie: ("ok", [FrameTask]) or ("failed", reason). Binds each style token as a side effect."""
        out = []
        for lm, blob in items:
            try:
                local = self._local_movie(lm, blob) if blob else lm
                out.append(("ok", self.renderer.tasks([local], overrides)))
                if blob:
                    self._bound.add(blob.sha256)
            except Exception as exc:
                out.append(("failed", _reason(exc)))
        return out

    def auto_batch_size(self, settings: BatchSettings) -> int:
        return self.renderer.auto_batch_size(settings)

    def render(self, jobs: list[FrameJob], settings: BatchSettings,
               styles: list[tuple[LoadedMovie, StyleBlob]]) -> dict[str, Any]:
        import numpy as np

        from .pipeline import render_batch

        r = self.renderer
        try:
            for lm, blob in styles:
                if blob.sha256 not in self._bound:  # a restarted worker binds again from the object store
                    r._style_token(self._local_movie(lm, blob))
                    self._bound.add(blob.sha256)
        except Exception as exc:
            return {"error": "input", "message": _reason(exc)}
        t0 = time.perf_counter()
        try:
            images = render_batch(r.model, r.backend, r.encoder, jobs, settings)
        except FloatingPointError as exc:
            return {"error": "render", "message": f"{exc}; fix: use --dtype fp32 (or bf16)"}
        except Exception as exc:
            return {"error": "oom" if _is_oom(exc) else "render", "message": _reason(exc)}
        # (B, H, W, 3) uint8: one contiguous array travels through the object store without copies.
        return {"images": np.stack(images), "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def immobilize(self, lm: LoadedMovie) -> dict[str, Any]:
        """Train the movie's style once (engine.style) and return the embedding file's bytes and its token."""
        try:
            from .style import immobilize

            path, token = immobilize(self.renderer, lm.movie.style)
            path = Path(path)
            return {"bytes": path.read_bytes(), "suffix": path.suffix, "token": token}
        except Exception as exc:
            return {"error": _reason(exc)}


# --- connecting and starting workers ------------------------------------------------------------------------

def _cluster_recorded() -> bool:
    """Whether address "auto" would find a running cluster (Ray's own lookup: RAY_ADDRESS, then the record that
    `ray start` leaves in the default temp folder)."""
    return bool(os.environ.get("RAY_ADDRESS")) or Path(tempfile.gettempdir(), "ray", "ray_current_cluster").exists()


def _import_ray(loopback: bool):
    if loopback:
        if "ray" in sys.modules and os.environ.get(_RAY_LOOPBACK_ENV) != "0":
            raise UserError("Ray was imported before movielm-fast could make its local cluster loopback-only",
                            f"set {_RAY_LOOPBACK_ENV}=0 before importing ray, or start Ray yourself "
                            "(ray.init / ray start) and pass its address")
        os.environ[_RAY_LOOPBACK_ENV] = "0"
    try:
        import ray
    except ImportError:
        raise UserError("--cluster ray needs Ray, which is not installed",
                        "pip install 'movielm-fast[cluster]'  (or: pip install 'ray>=2.30')") from None
    return ray


def _connect(opts: ClusterOptions):
    """Returns (ray module, whether we started Ray and must shut it down)."""
    address = opts.address or "auto"
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return loaded, False  # the caller set Ray up (e.g. tests, notebooks): use it as it is
    local = address == "local" or (address == "auto" and not _cluster_recorded())
    ray = _import_ray(loopback=local)
    common = {"include_dashboard": False, "logging_level": logging.WARNING}
    if local:
        ray.init(address="local", _node_ip_address="127.0.0.1", **common)
        if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
            ray.shutdown()
            raise UserError("the local Ray instance did not bind to 127.0.0.1",
                            f"set {_RAY_LOOPBACK_ENV}=0 in the environment before running movielm-fast")
        return ray, True
    try:
        ray.init(address=address, **common)
    except Exception as exc:
        msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "ray[client]" in msg:
            raise UserError(f"--address {address} uses Ray Client, which is not installed",
                            "pip install 'ray[client]>=2.30', or run on the head node with --address auto") from None
        raise UserError(f"cannot reach the Ray cluster at {address}: {msg}",
                        "check that the cluster is up (`ray status` on the head node), the address and port, and "
                        "firewalls; or use --address local to start a private one on this machine") from None
    return ray, True


def _worker_shape(ray, config: EngineConfig, opts: ClusterOptions) -> tuple[int, dict[str, Any], int | None]:
    """(number of workers, actor resource options, torch threads); clear errors when the cluster can't host them."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if opts.workers is not None and opts.workers < 1:
        raise UserError(f"--workers {opts.workers} must be at least 1")
    if config.device.startswith("cuda"):
        g = float(opts.gpus_per_worker)
        if g <= 0:
            raise UserError("--gpus-per-worker must be positive with --device cuda")
        largest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        if largest == 0:
            raise UserError("no worker can fit the model: the Ray cluster has no GPUs",
                            "use --device cpu, or add GPU nodes to the cluster")
        if g > largest:
            raise UserError(f"no worker can fit the model: --gpus-per-worker {g:g} but the largest node has "
                            f"{largest:g} GPU(s)", f"use --gpus-per-worker {largest:g} or less")
        capacity = sum(int(n.get("GPU", 0.0) // g) for n in nodes)
        workers = opts.workers or capacity
        if workers > capacity:
            raise UserError(f"--workers {workers} is more than the cluster can host: {capacity} worker(s) of "
                            f"{g:g} GPU each", f"use --workers {capacity} or fewer, or add GPUs")
        return workers, {"num_gpus": g, "num_cpus": 1}, None
    total = int(sum(n.get("CPU", 0.0) for n in nodes))
    largest = int(max((n.get("CPU", 0.0) for n in nodes), default=0.0))
    if largest < 1:
        raise UserError("no worker can fit the model: the Ray cluster reports no CPUs",
                        "check `ray status`; start nodes with --num-cpus")
    cores = opts.cpus_per_worker or (max(1, total // opts.workers) if opts.workers else
                                     min(CPU_CORES_PER_WORKER, largest))
    if cores > largest:
        raise UserError(f"no worker can fit the model: {cores} cores per worker but the largest node has {largest}",
                        f"use fewer cores per worker (at most {largest})")
    capacity = sum(int(n.get("CPU", 0.0) // cores) for n in nodes)
    workers = opts.workers or capacity
    if workers > capacity:
        raise UserError(f"--workers {workers} is more than the cluster can host: {total} CPU core(s) give "
                        f"{capacity} worker(s) of {cores} core(s)", f"use --workers {capacity} or fewer")
    return workers, {"num_cpus": cores}, cores


# --- the scheduler -------------------------------------------------------------------------------------------

MAX_CRASHES_PER_ITEM = 3
"""Worker deaths one batch may cause before it is treated as the cause rather than resubmitted again."""

class _Pool:
    """Hands work items to ready workers, keeps `in_flight` per worker, and moves the work of a dead worker back to
    the front of the queue. Each item is in the queue or in flight on exactly one worker, never both."""

    def __init__(self, ray, handles: list, infos: list[dict[str, Any]], opts: ClusterOptions):
        self.ray = ray
        self.handles = handles
        self.opts = opts
        self.state = ["ready"] * len(handles)
        self.busy = [0] * len(handles)
        self.inflight: dict[Any, tuple[int, Any]] = {}  # ref -> (worker, item)
        self.pings: dict[Any, tuple[int, float]] = {}  # ref of info() on a restarting worker -> (worker, since)
        self.retry: dict[int, tuple[float, float]] = {}  # worker -> (when to ask again, since)
        self.resubmitted = 0
        self.crashes: dict[int, int] = {}  # id(item) -> worker deaths while it was in flight
        self.model: dict[str, Any] = infos[0]["model"]
        self.dtype: str = infos[0]["dtype"]
        self.stats = [{"worker": i, "node": inf["node"], "pids": [inf["pid"]], "load_seconds": [round(
            inf["load_seconds"], 3)], "restarts": 0, "frames": 0, "batches": 0, "busy_seconds": 0.0}
            for i, inf in enumerate(infos)]

    def new_job(self) -> None:
        """Per-job counters start at zero; what the workers are (pids, load times, restarts) carries over."""
        self.resubmitted = 0
        for s in self.stats:
            s.update(frames=0, batches=0, busy_seconds=0.0)

    def _worker_failed(self, i: int, exc: BaseException) -> None:
        if self.state[i] == "ready":
            log.warning("worker %d failed (%s); its batches go to other workers while Ray restarts it", i,
                        str(exc).splitlines()[0][:200])
            self.state[i] = "restarting"
            self.pings[self.handles[i].info.remote()] = (i, time.monotonic())

    def _ping_done(self, ref) -> None:
        i, since = self.pings.pop(ref)
        ray = self.ray
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:
            log.warning("worker %d is gone for good: %s", i, str(exc).splitlines()[0][:200])
            self.state[i] = "dead"
            return
        except ray.exceptions.RayError:  # not reachable yet (restarting): ask again soon while there is time
            if time.monotonic() - since < self.opts.start_timeout_s:
                self.retry[i] = (time.monotonic() + 1.0, since)
            else:
                self.state[i] = "dead"
            return
        if info["error"]:
            log.warning("worker %d restarted but could not load the model: %s", i, info["error"]["message"])
            self.state[i] = "dead"
            return
        self.state[i] = "ready"
        s = self.stats[i]
        s["restarts"] += 1
        s["pids"].append(info["pid"])
        s["load_seconds"].append(round(info["load_seconds"], 3))
        if self.opts.on_worker_ready:
            self.opts.on_worker_ready({"index": i, **info})

    def run(self, items: list, submit: Callable[[Any, Any], Any], done: Callable[[Any, Any, int], list],
            what: str = "item") -> None:
        """submit(handle, item) -> ref; done(item, result, worker) -> items to put back at the front."""
        queue = deque(items)
        try:
            self._run(queue, submit, done, what)
        finally:
            if self.inflight:  # interrupted: drop the work not started yet, so the workers are free for the next job
                for ref in self.inflight:
                    try:
                        self.ray.cancel(ref)
                    except Exception:  # finished or already gone meanwhile
                        pass
                self.inflight.clear()
                self.busy = [0] * len(self.handles)

    def _run(self, queue: deque, submit: Callable[[Any, Any], Any], done: Callable[[Any, Any, int], list],
             what: str) -> None:
        ray = self.ray
        limit = max(1, self.opts.in_flight_per_worker)
        while queue or self.inflight:
            now = time.monotonic()
            for i, (due, since) in list(self.retry.items()):
                if due <= now:
                    del self.retry[i]
                    self.pings[self.handles[i].info.remote()] = (i, since)
            while queue:
                ready = [i for i, st in enumerate(self.state) if st == "ready" and self.busy[i] < limit]
                if not ready:
                    break
                i = min(ready, key=lambda k: self.busy[k])
                item = queue.popleft()
                self.inflight[submit(self.handles[i], item)] = (i, item)
                self.busy[i] += 1
            if not self.inflight and not self.pings and not self.retry:
                raise UserError(f"every worker died; {len(queue)} {what}(s) were not done",
                                "see the Ray worker logs for the cause (host out of memory?); run the same "
                                "command again: finished frames are kept")
            timeout = max(0.0, min(d for d, _ in self.retry.values()) - now) if self.retry else None
            refs = list(self.inflight) + list(self.pings)
            if not refs:  # only workers waiting to be asked again
                time.sleep(timeout)
                continue
            ready_refs, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if not ready_refs:
                continue
            ref = ready_refs[0]
            if ref in self.pings:
                self._ping_done(ref)
                continue
            i, item = self.inflight.pop(ref)
            self.busy[i] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # our method raised despite catching: a bug, not a crash
                result = {"error": "render", "message": _reason(exc)}
            except ray.exceptions.RayError as exc:  # the worker process or its node died
                self._worker_failed(i, exc)
                crashes = self.crashes[id(item)] = self.crashes.get(id(item), 0) + 1
                if crashes < MAX_CRASHES_PER_ITEM:
                    queue.appendleft(item)
                    self.resubmitted += 1
                    continue
                # The same work killed several workers: it is the cause (a poison pill), not bad luck. Report it
                # like an error raised while rendering, so it is isolated to the movie(s) it belongs to.
                result = {"error": "crash", "message": f"a worker process died {crashes} times on this {what} "
                                                       f"(last: {str(exc).splitlines()[0][:200]})"}
            self.crashes.pop(id(item), None)
            queue.extendleft(reversed(done(item, result, i)))


# --- the driver ----------------------------------------------------------------------------------------------

def _style_blobs(ray, movies: list[LoadedMovie], failures: dict[str, str]) -> dict[str, StyleBlob]:
    """movie id -> its embedding's bytes in the object store (each file read and stored once)."""
    by_path: dict[Path, StyleBlob | str] = {}
    blobs: dict[str, StyleBlob] = {}
    for lm in movies:
        if not lm.movie.style.embedding:
            continue
        path = (lm.plan_dir / lm.movie.style.embedding).resolve()
        if path not in by_path:
            try:
                data = path.read_bytes()
                by_path[path] = StyleBlob(hashlib.sha256(data).hexdigest(), path.suffix, ray.put(data))
            except OSError as exc:
                by_path[path] = f"cannot read style embedding {path}: {exc.strerror or exc}"
        blob = by_path[path]
        if isinstance(blob, str):
            failures[lm.movie.id] = blob
        else:
            blobs[lm.movie.id] = blob
    return blobs


def _immobilize_styles(ray, pool: _Pool, config: EngineConfig, movies: dict[str, LoadedMovie],
                       blobs: dict[str, StyleBlob], failures: dict[str, str]) -> None:
    """THE call site for style training on a cluster: each style without an embedding is trained once, on one
    worker, before any of its frames is planned; the file reaches every worker as a StyleBlob and the movie (as
    the workers see it) gets the learned token. `engine.style.immobilize(renderer, style) -> (path, token)`."""
    if not config.style_training:
        return
    todo: dict[tuple, list[str]] = {}
    for movie_id, lm in movies.items():
        st = lm.movie.style
        if not st.embedding and movie_id not in failures:
            todo.setdefault((st.name, st.description, st.token), []).append(movie_id)

    def done(group: list[str], result: dict[str, Any], worker: int) -> list:
        if "error" in result:
            for movie_id in group:
                failures[movie_id] = f"style training failed: {result['error']}"
            return []
        data = result["bytes"]
        blob = StyleBlob(hashlib.sha256(data).hexdigest(), result["suffix"], ray.put(data))
        for movie_id in group:
            lm = movies[movie_id]
            style = lm.movie.style.model_copy(update={"token": result["token"]})
            movies[movie_id] = lm.model_copy(update={"movie": lm.movie.model_copy(update={"style": style})})
            blobs[movie_id] = blob
        return []

    pool.run(list(todo.values()), lambda h, group: h.immobilize.remote(movies[group[0]]), done, what="style")


# Config fields a started worker's Renderer depends on; a pool renders any config that agrees on them.
_WORKER_FIELDS = ("model", "backend", "device", "dtype", "attention", "channels_last", "cuda_graphs")


class RayRenderPool:
    """Started workers (model loaded, engine warm), reusable for several jobs; `render_on_ray` makes one per job.

        with RayRenderPool(config, ClusterOptions(workers=4)) as pool:
            pool.render(["plans/"])
    """

    def __init__(self, config: EngineConfig, opts: ClusterOptions | None = None):
        t0 = time.perf_counter()
        self.config = config
        self.opts = opts or ClusterOptions()
        self.ray, self._started_ray = _connect(self.opts)
        self._handles: list = []
        try:
            n, resources, threads = _worker_shape(self.ray, config, self.opts)
            # Ray shows a GPU worker only its own device(s), as cuda:0.
            worker_config = dataclasses.replace(config, device="cuda") if config.device.startswith("cuda") else config
            # Restarts bring a crashed worker back; task retries stay off so that the driver alone decides where a
            # failed batch goes next (a batch is never in flight twice, so no frame is ever written twice).
            actor = self.ray.remote(max_restarts=self.opts.max_restarts, max_task_retries=0,
                                    runtime_env=self.opts.runtime_env, **resources)(RenderWorker)
            self._handles = [actor.remote(worker_config, threads) for _ in range(n)]
            self._pool = _start(self.ray, self._handles, self.opts)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - t0

    def render(self, plan_paths: list[str | Path], progress: Callable[[int, int], None] | None = None,
               config: EngineConfig | None = None) -> ClusterSummary:
        """Like `runner.render`. `config` may change out, render overrides, batch size, skip_existing; not the
        model or anything else the workers were started with."""
        config = config or self.config
        differ = [f for f in _WORKER_FIELDS if getattr(config, f) != getattr(self.config, f)]
        if differ:
            raise UserError(f"this pool's workers were started with another {', '.join(differ)}",
                            "start a new pool (or call render_on_ray) for a different model or device")
        t0 = time.perf_counter()
        movies = collect_plans(plan_paths)
        summary = ClusterSummary(movies=len(movies))
        _render(self.ray, self._pool, config, movies, summary, progress)
        summary.seconds = time.perf_counter() - t0
        return summary

    @property
    def worker_pids(self) -> list[int]:
        return [s["pids"][-1] for s in self._pool.stats]

    def close(self) -> None:
        for h in self._handles:
            try:
                self.ray.kill(h, no_restart=True)  # also stops batches still in flight after an interrupt
            except Exception:  # already gone
                pass
        self._handles = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayRenderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_on_ray(config: EngineConfig, plan_paths: list[str | Path], opts: ClusterOptions | None = None,
                  progress: Callable[[int, int], None] | None = None) -> ClusterSummary:
    """Render every frame of every movie on a Ray cluster; same outputs and resume rules as `runner.render`."""
    t0 = time.perf_counter()
    collect_plans(plan_paths)  # every plan valid before a worker starts
    with RayRenderPool(config, opts) as pool:
        summary = pool.render(plan_paths, progress)
    summary.startup_seconds = pool.startup_seconds
    summary.seconds = time.perf_counter() - t0
    return summary


def _start(ray, handles: list, opts: ClusterOptions) -> _Pool:
    """Wait for the workers to load the model; keep those that did, explain if none did."""
    refs = [h.info.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=opts.start_timeout_s)
    infos: dict[int, dict[str, Any]] = {}
    errors: list[dict[str, str]] = []
    for i, ref in enumerate(refs):
        if ref not in ready:
            continue
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            errors.append({"kind": "start", "message": str(exc).splitlines()[0][:300], "hint": ""})
            continue
        if info["error"]:
            errors.append(info["error"])
        else:
            infos[i] = info
    if not infos:
        if not ready:
            raise UserError(f"no worker started within {opts.start_timeout_s:g} s",
                            "the cluster has no free resources for them (other jobs?); check `ray status`")
        err = errors[0]
        if err["kind"] == "oom":
            raise UserError(f"no worker can fit the model: {err['message']}",
                            "use --dtype fp16, --gpus-per-worker with larger devices, or a smaller model")
        raise UserError(f"the workers could not load the model: {err['message']}", err["hint"] or None)
    for i in sorted(set(range(len(handles))) - set(infos)):
        log.warning("worker %d did not start (%s); going on with %d worker(s)", i,
                    errors[0]["message"] if errors else "timed out", len(infos))
        ray.kill(handles[i], no_restart=True)  # give its resources back
    hashes = {inf["model"]["content_hash"] for inf in infos.values()}
    if len(hashes) > 1:
        raise UserError(f"workers loaded different model files (content hashes {', '.join(sorted(hashes))})",
                        "give every node the same model folder at the same path")
    keep = sorted(infos)
    pool = _Pool(ray, [handles[i] for i in keep], [infos[i] for i in keep], opts)
    if opts.on_worker_ready:
        for k, i in enumerate(keep):
            opts.on_worker_ready({"index": k, **infos[i]})
    return pool


def _render(ray, pool: _Pool, config: EngineConfig, movies: list[LoadedMovie], summary: ClusterSummary,
            progress: Callable[[int, int], None] | None) -> None:
    pool.new_job()
    failures: dict[str, str] = {}
    blobs = _style_blobs(ray, movies, failures)
    by_id = {lm.movie.id: lm for lm in movies}  # as the plans say: what manifests record
    work = dict(by_id)  # as workers see them: may carry a trained style's token
    _immobilize_styles(ray, pool, config, work, blobs, failures)

    # Plan on the workers (they hold the tokenizers and bound tokens), a chunk of movies per call.
    todo_movies = [work[lm.movie.id] for lm in movies if lm.movie.id not in failures]
    per = max(1, min(64, -(-len(todo_movies) // max(1, len(pool.handles)))))
    chunks = [todo_movies[i:i + per] for i in range(0, len(todo_movies), per)]
    planned: dict[str, list[FrameTask]] = {}

    def planned_chunk(chunk: list[LoadedMovie], result, worker: int) -> list:
        if isinstance(result, dict):  # the call itself failed
            for lm in chunk:
                failures[lm.movie.id] = result["message"]
            return []
        for lm, (status, value) in zip(chunk, result):
            if status == "ok":  # tasks carry the worker's copy of the movie; manifests want the driver's
                planned[lm.movie.id] = [dataclasses.replace(t, movie=by_id[lm.movie.id]) for t in value]
            else:
                failures[lm.movie.id] = value
        return []

    def plan(handle, chunk: list[LoadedMovie]):
        return handle.plan.remote([(lm, blobs.get(lm.movie.id)) for lm in chunk], config.overrides)

    pool.run(chunks, plan, planned_chunk, what="plan chunk")

    # What the manifests say about the model, as a local run on a worker would write it.
    stand_in = SimpleNamespace(model=SimpleNamespace(**pool.model),
                               config=dataclasses.replace(config, dtype=pool.dtype, device="cpu"))
    good = [lm for lm in movies if lm.movie.id in planned]
    outputs = {lm.movie.id: MovieOutputs(config, lm, stand_in) for lm in good}
    tasks = [t for lm in good for t in planned[lm.movie.id]]
    todo = [t for t in tasks if not (config.skip_existing and outputs[t.job.movie_id].is_done(t))]
    summary.frames_total = sum(len(lm.movie.frames) for lm in movies)
    summary.frames_skipped = len(tasks) - len(todo)
    for mo in outputs.values():
        mo.save()  # drops entries of frames no longer in the plan, as a local run does

    size = config.batch_size
    if todo and size == "auto":
        refs = [h.auto_batch_size.remote(todo[0].settings) for h, st in zip(pool.handles, pool.state) if st == "ready"]
        size = min(ray.get(refs))
    size = int(size) if todo else 1
    summary.batch_size = size
    if progress:
        progress(0, len(todo))

    def submit(handle, batch: list[FrameTask]):
        styles = {blobs[t.job.movie_id].sha256: (work[t.job.movie_id], blobs[t.job.movie_id]) for t in batch
                  if t.job.movie_id in blobs}
        return handle.render.remote([t.job for t in batch], batch[0].settings, list(styles.values()))

    def rendered(batch: list[FrameTask], result: dict[str, Any], worker: int) -> list:
        if "error" in result:
            if len(batch) > 1:
                # OOM: halve, as a local run does. Other errors: render frames alone, so one bad movie cannot
                # take the other movies of its batch down with it.
                if result["error"] == "oom":
                    log.warning("out of memory at batch %d; retrying as %d + %d", len(batch), len(batch) // 2,
                                len(batch) - len(batch) // 2)
                    return [batch[:len(batch) // 2], batch[len(batch) // 2:]]
                return [[t] for t in batch]
            reason = "out of memory even at batch size 1" if result["error"] == "oom" else result["message"]
            failures.setdefault(batch[0].job.movie_id, reason)
            return []
        seconds = result["seconds"] / len(batch)
        for task, image in zip(batch, result["images"]):
            outputs[task.job.movie_id].add(task, image, seconds)
        for movie_id in {t.job.movie_id for t in batch}:
            outputs[movie_id].save()
        st = pool.stats[worker]
        st["frames"] += len(batch)
        st["batches"] += 1
        st["busy_seconds"] += result["seconds"]
        summary.frames_rendered += len(batch)
        summary.unet_steps += batch[0].settings.steps
        if progress:
            progress(len(batch), len(todo))
        return []

    tr = time.perf_counter()
    try:
        pool.run(_batches(todo, size), submit, rendered, what="batch")
    finally:
        # Wall time of the whole render phase: images/s overall is frames over this, not over the sum of workers.
        summary.render_seconds = time.perf_counter() - tr
        summary.resubmitted_batches = pool.resubmitted
        summary.workers = [{**s, "busy_seconds": round(s["busy_seconds"], 3), "images_per_second": round(
            s["frames"] / s["busy_seconds"], 4) if s["busy_seconds"] else 0.0} for s in pool.stats]

    for mo in outputs.values():
        if mo.complete():
            summary.storyboards.append(str(mo.write_storyboard()))
    for movie_id, reason in failures.items():
        mo = outputs.get(movie_id)
        missing = len(by_id[movie_id].movie.frames) - (sum(f.id in mo.entries for f in mo.lm.movie.frames) if mo else 0)
        summary.failures.append({"movie": movie_id, "reason": reason, "frames_missing": missing})
        summary.frames_failed += missing
