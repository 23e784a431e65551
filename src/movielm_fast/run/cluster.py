"""Rendering on a Ray cluster: `RayExecutor`, the executor the one driver (run.driver) uses for Ray runs.

Ray is imported here and nowhere else; it is the optional extra ``movielm-fast[cluster]``.

What Ray does, and what stays with the driver:
- Placement: one long-lived actor (`RenderWorker`) per GPU, or per group of CPU cores, each loading the model once.
- Restarts and retries: a worker process that dies is restarted by Ray (`max_restarts`) and the batches it had are
  re-run on it by Ray's own actor-task retries (`max_task_retries`). Frames are deterministic, so a re-run batch
  gives the same pixels, and since only the driver writes files, each frame is still written once.
- The object store: batches go out as frame jobs and style vectors, frames come back already encoded (PNG/JPEG/
  WebP bytes, encoded on the worker that rendered them); the driver only writes bytes and manifests, so no shared
  filesystem is needed and the driver's CPU never becomes the bottleneck.
- A batch whose worker died more often than its retries allow is the likely cause (a "poison pill"): it comes back
  as a failure and the driver isolates its movie. A worker that is gone for good is dropped and its batch goes to
  another worker.

Outputs go to `config.out` on the driver's machine. Workers need the model at the same path (or "demo") and
movielm-fast installed (or pass `ClusterOptions.runtime_env`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.families import family_of_spec
from movielm_fast.engine.jobs import BatchSettings
from movielm_fast.engine.oom import is_oom
from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings, Style

from .config import CPU_CORES_PER_WORKER, ClusterOptions, RunConfig
from .driver import Job, Progress, Summary, render_job, report_stage
from .executors import plan_movies, reason, run_batch
from .renderer import Renderer
from .tasks import Batch, Failed, ModelInfo, MoviePlan, PlanItem, Rendered, StyleToken

log = logging.getLogger("movielm_fast")


# Ray reads this when it is imported: "0" makes a local instance use the loopback address for every server it
# starts (GCS, raylet, object manager, workers) instead of the machine's network address. A private local
# cluster must not be reachable from the network.
_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# --- the worker ----------------------------------------------------------------------------------------------

class RenderWorker:
    """One long-lived Ray actor around a `Renderer`. Its methods return errors as data, so the driver can tell a
    bad movie (report it, go on) from a dead worker (Ray raises RayActorError)."""

    def __init__(self, config: ModelConfig, threads: int | None):
        t0 = time.perf_counter()
        self.error: dict[str, str] | None = None
        self.renderer: Renderer | None = None
        try:
            # One worker per core group: its threads must not oversubscribe the cores.
            self.renderer = Renderer(config.changed(threads=threads) if threads else config)
        except Exception as exc:  # reported through info(); the driver decides what it means
            oom = is_oom(exc) or "out of memory" in str(exc).lower()  # loaders wrap OOM into a UserError
            self.error = {"kind": "oom" if oom else "load", "message": reason(exc),
                          "hint": getattr(exc, "hint", None) or ""}
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        import ray  # an actor runs in a process of Ray's, where ray is importable by definition

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "load_seconds": self.load_seconds,
                "error": self.error, "model": self.renderer.info if self.renderer else None}

    def train_style(self, style: Style) -> StyleToken | str:
        try:
            return self.renderer.train_style(style)
        except Exception as exc:
            return reason(exc)

    def plan(self, items: list[PlanItem], overrides: RenderSettings) -> list[MoviePlan | str]:
        return plan_movies(self.renderer, items, overrides)

    def batch_size(self, settings: BatchSettings) -> int:
        return self.renderer.auto_batch_size(settings)

    def render(self, batch: Batch) -> tuple[Rendered | Failed, int]:
        return run_batch(self.renderer, batch, encode=True), os.getpid()


# --- connecting and placing workers ---------------------------------------------------------------------------

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


def _worker_shape(ray, config: ModelConfig, opts: ClusterOptions) -> tuple[int, dict[str, Any], int | None]:
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


# --- the executor -----------------------------------------------------------------------------------------------

class RayExecutor:
    """Started workers (model loaded, engine warm) behind the driver's executor interface; reusable for several
    jobs (`run.driver.render(run, plans, executor=...)`), so workers start once.

        with RayExecutor(model, ClusterOptions(workers=4)) as ex:
            render(run, ["plans/"], executor=ex)
    """

    def __init__(self, config: ModelConfig, opts: ClusterOptions | None = None):
        t0 = time.perf_counter()
        self.opts = opts or ClusterOptions()
        self.ray, self._started_ray = _connect(self.opts)
        self.handles: list = []
        self._inflight: dict[Any, tuple[int, Batch, int]] = {}  # ref -> (worker, batch, worker pid at submit)
        try:
            n, resources, threads = _worker_shape(self.ray, config, self.opts)
            # Ray shows a GPU worker only its own device(s), as cuda:0.
            worker_config = config.changed(device="cuda") if config.device.startswith("cuda") else config
            actor = self.ray.remote(max_restarts=self.opts.max_restarts, max_task_retries=self.opts.max_task_retries,
                                    runtime_env=self.opts.runtime_env, **resources)(RenderWorker)
            self._start([actor.remote(worker_config, threads) for _ in range(n)])
        except BaseException:
            self.shutdown()
            raise
        self.startup_seconds = time.perf_counter() - t0

    def _start(self, handles: list) -> None:
        """Wait for the workers to load the model; keep those that did, explain if none did."""
        ray, opts = self.ray, self.opts
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
        self.handles = handles  # close() stops every one of them
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
        hashes = {inf["model"].content_hash for inf in infos.values()}
        if len(hashes) > 1:
            raise UserError(f"workers loaded different model files (content hashes {', '.join(sorted(hashes))})",
                            "give every node the same model folder at the same path")
        keep = sorted(infos)
        self.handles = [handles[i] for i in keep]
        self.info: ModelInfo = infos[keep[0]]["model"]
        self.alive = [True] * len(keep)
        self.busy = [0] * len(keep)
        self.stats = [{"worker": k, "node": infos[i]["node"], "pids": [infos[i]["pid"]],
                       "load_seconds": [round(infos[i]["load_seconds"], 3)], "restarts": 0} for k, i in enumerate(keep)]
        self._new_job()

    def _new_job(self) -> None:
        """Per-job counters start at zero; what the workers are (pids, load times, restarts) carries over."""
        for s in self.stats:
            s.update(frames=0, batches=0, busy_seconds=0.0, rerun_batches=0)

    @property
    def worker_pids(self) -> list[int]:
        return [s["pids"][-1] for s in self.stats]

    def _live(self) -> list[int]:
        live = [i for i, ok in enumerate(self.alive) if ok]
        if not live:
            raise UserError("every worker died", "see the Ray worker logs for the cause (host out of memory?); run "
                                                 "the same command again: finished frames are kept")
        return live

    def _call(self, method: str, *args) -> Any:
        """One call on some live worker, moving on to the next one if a worker is gone for good."""
        while True:
            i = min(self._live(), key=lambda k: self.busy[k])
            try:
                return self.ray.get(getattr(self.handles[i], method).remote(*args))
            except self.ray.exceptions.RayActorError:
                self._check_worker(i)

    def _check_worker(self, i: int) -> bool:
        """After a RayActorError: is worker i coming back (Ray restarts it) or gone for good?"""
        try:
            info = self.ray.get(self.handles[i].info.remote(), timeout=self.opts.start_timeout_s)
        except self.ray.exceptions.RayError as exc:
            log.warning("worker %d is gone for good: %s", i, str(exc).splitlines()[0][:200])
            self.alive[i] = False
            return False
        self._saw_pid(i, info["pid"], info["load_seconds"])
        return True

    def _saw_pid(self, i: int, pid: int, load_seconds: float | None = None) -> None:
        s = self.stats[i]
        if pid != s["pids"][-1]:  # Ray restarted the worker since we last heard from it
            s["restarts"] += 1
            s["pids"].append(pid)
            if load_seconds is not None:
                s["load_seconds"].append(round(load_seconds, 3))

    # --- the executor interface --------------------------------------------------------------------------------
    def train_style(self, style: Style) -> StyleToken:
        result = self._call("train_style", style)
        if isinstance(result, str):
            raise UserError(result)
        return result

    def plan(self, items: list[PlanItem], overrides: RenderSettings) -> list[MoviePlan | str]:
        self._new_job()
        # Chunks of movies spread over the workers (they hold the tokenizers and bind the tokens), in parallel.
        live = self._live()
        per = max(1, min(64, -(-len(items) // len(live))))
        chunks = [items[k:k + per] for k in range(0, len(items), per)]
        refs = [self.handles[live[j % len(live)]].plan.remote(c, overrides) for j, c in enumerate(chunks)]
        out: list[MoviePlan | str] = []
        for chunk, ref in zip(chunks, refs):
            try:
                out += self.ray.get(ref)
            except self.ray.exceptions.RayActorError:  # that worker is gone: ask another one
                out += self._call("plan", chunk, overrides)
        return out

    def batch_size(self, settings: BatchSettings) -> int:
        return min(self.ray.get([self.handles[i].batch_size.remote(settings) for i in self._live()]))

    def has_room(self) -> bool:
        return any(self.busy[i] < max(1, self.opts.in_flight_per_worker) for i in self._live())

    def submit(self, batch: Batch) -> None:
        i = min(self._live(), key=lambda k: self.busy[k])
        self._inflight[self.handles[i].render.remote(batch)] = (i, batch, self.stats[i]["pids"][-1])
        self.busy[i] += 1

    @property
    def pending(self) -> int:
        return len(self._inflight)

    def next_result(self) -> tuple[Batch, Rendered | Failed]:
        ray = self.ray
        while True:
            (ref,), _ = ray.wait(list(self._inflight), num_returns=1)
            i, batch, pid = self._inflight.pop(ref)
            self.busy[i] -= 1
            try:
                result, now = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if self._check_worker(i):
                    # The worker is back, yet this batch died with it more often than Ray retries: the cause.
                    return batch, Failed(f"a worker process died {self.opts.max_task_retries + 1} times on this "
                                         f"batch (last: {str(exc).splitlines()[0][:200]})")
                self.submit(batch)  # its worker is gone for good: another one renders it
                continue
            except ray.exceptions.RayTaskError as exc:  # our method raised despite catching: a bug, not a crash
                return batch, Failed(reason(exc))
            self._saw_pid(i, now)
            s = self.stats[i]
            if now != pid:
                s["rerun_batches"] += 1  # Ray re-ran it on the restarted worker
            if isinstance(result, Rendered):
                s["frames"] += len(batch.tasks)
                s["batches"] += 1
                s["busy_seconds"] += result.seconds
            return batch, result

    def worker_stats(self) -> list[dict[str, Any]]:
        return [{**s, "busy_seconds": round(s["busy_seconds"], 3), "images_per_second": round(
            s["frames"] / s["busy_seconds"], 4) if s["busy_seconds"] else 0.0} for s in self.stats]

    def cancel(self) -> None:
        for ref in self._inflight:  # interrupted: drop work not started yet, so the workers are free again
            try:
                self.ray.cancel(ref)
            except Exception:  # finished or already gone meanwhile
                pass
        self._inflight.clear()
        self.busy = [0] * len(self.handles)

    def shutdown(self) -> None:
        """Stop the workers (and the Ray instance this executor started)."""
        self.cancel()
        for h in self.handles:
            try:
                self.ray.kill(h, no_restart=True)
            except Exception:  # already gone
                pass
        self.handles = []
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def render_on_ray(model: ModelConfig, run: RunConfig, plan_paths: list[str | Path],
                  opts: ClusterOptions | None = None, progress: Progress | None = None) -> Summary:
    """Start workers, render every frame of every movie with the one driver, stop the workers."""
    report_stage(progress, "validate")
    # Every plan valid, and the output folder writable, before a worker starts.
    job = Job.load(run, plan_paths, family=family_of_spec(model.model))
    report_stage(progress, "load")
    with RayExecutor(model, opts) as executor:
        return render_job(job, executor, progress)
