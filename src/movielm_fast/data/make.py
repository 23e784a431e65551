"""`make`: themes in, a finished dataset out, as one streaming, resumable job.

    plan (LLM pool) -> style + keyframes (the one driver, run.driver.render, on one long-lived executor)
                    -> QA (LLM pool) -> dataset export over every finished movie; OUT/index.html and OUT/make.json

The caller's thread renders ready plans, one movie per `render()` call, on the one executor (the model loads
once). Meanwhile a bounded pool of LLM threads writes later plans and the QA
of rendered movies, so rendering waits for the LLM only when no plan is ready.

Resume: each stage's product is a file, trusted only when it was made from the current inputs:
- plans: OUT/plans/<stem>.json; OUT/.make/plans/<stem>.json records the request it answers (theme, version,
  counts), so changing --frames re-plans, and nothing else does;
- frames: the driver's manifests (prompt, seed, model, settings): finished frames are never re-rendered;
- QA: OUT/movies/<id>/qa.json; OUT/.make/qa/<id>.json records a digest of the plan and the QA settings, so a new
  image model keeps the QA, a new plan redoes it.
A stamp is written before the file it vouches for is (re)made and removed when it no longer matches, so after a
kill at any moment an existing file is never one made for other inputs. LLM answers come from the response cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_text
from movielm_fast.plan import Movie, absolute_plan_paths, load_plan
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import check_output_folder, render
from movielm_fast.run.executors import Executor, reason

from .dataset import DatasetOptions, export_dataset
from .gallery import write_gallery
from .llm import planner, qa
from .llm.client import LLMClient

STAGES = ("plan", "style", "render", "qa", "dataset")
STYLE_FAILURE = "style training failed: "  # how the driver words a style that could not be immobilized


@dataclass
class MakeJob:
    out: Path
    requests: list[planner.PlanRequest]
    max_tries: int = 3
    """LLM answers asked per plan or QA item when the output is invalid."""
    qa_source: qa.Source = "both"
    plot_questions: int = 5
    derived_limit: int = 5
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    """Format, video and timing of the export; its paths and movie list are set by `make`."""

    @property
    def qa_job(self) -> qa.QAJob:
        return qa.QAJob(self.qa_source, self.plot_questions, self.derived_limit, self.max_tries,
                        self.out / ".make" / "qa-failed", any(r.strict_counts for r in self.requests))


@dataclass
class Stage:
    """Counts and times of one stage. `busy_seconds` sums the work of its items (LLM requests overlap, so it
    can exceed the wall time); `wall_seconds` runs from its first start to its last end."""

    done: int = 0
    kept: int = 0
    """Items already done by an earlier run (counted in `done` as well)."""
    in_flight: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    first_start: float | None = None
    last_end: float | None = None
    frames: int = 0
    """render: frames rendered by this run."""
    frames_total: int = 0
    counts_frames: bool = False

    def as_dict(self) -> dict[str, Any]:
        wall = (self.last_end - self.first_start) if self.first_start and self.last_end else 0.0
        d = {"done": self.done, "kept": self.kept, "failed": self.failed, "busy_seconds": round(self.busy_seconds, 3),
             "wall_seconds": round(wall, 3)}
        if self.counts_frames:
            d.update(frames_rendered=self.frames, frames_total=self.frames_total,
                     images_per_second=round(self.frames / self.busy_seconds, 4) if self.busy_seconds else 0.0)
        return d


class MakeProgress:
    """What the live display shows: one `Stage` per stage, read by the display's thread while the job's threads
    update it (the lock keeps each update whole)."""

    def __init__(self) -> None:
        self.stages = {name: Stage(counts_frames=name == "render") for name in STAGES}
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()

    @contextmanager
    def working(self, name: str) -> Iterator[Stage]:
        stage = self.stages[name]
        with self.lock:
            stage.in_flight += 1
            stage.first_start = stage.first_start or time.perf_counter()
        t = time.perf_counter()
        try:
            yield stage
        finally:
            with self.lock:
                stage.in_flight -= 1
                stage.busy_seconds += time.perf_counter() - t
                stage.last_end = time.perf_counter()

    def add_time(self, name: str, seconds: float) -> None:
        """Work of a stage that runs inside another one (style immobilization inside render())."""
        with self.lock:
            stage = self.stages[name]
            stage.busy_seconds += seconds
            stage.last_end = time.perf_counter()
            stage.first_start = stage.first_start or stage.last_end - seconds

    def count(self, name: str, done: int = 0, failed: int = 0, kept: int = 0, frames: int = 0,
              frames_total: int = 0) -> None:
        with self.lock:
            s = self.stages[name]
            s.done += done
            s.failed += failed
            s.kept += kept
            s.frames += frames
            s.frames_total += frames_total

    def snapshot(self) -> dict[str, Stage]:
        with self.lock:
            return {k: dataclasses.replace(v) for k, v in self.stages.items()}


@dataclass
class MakeReport:
    out: Path
    seconds: float = 0.0
    requested: int = 0
    finished: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, Stage] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    def ordered_failures(self) -> list[dict[str, Any]]:
        """In stage order, then by theme, version and movie: concurrent LLM requests fail in any order, and the
        report and the gallery must not depend on it."""
        return sorted(self.failures, key=lambda f: (STAGES.index(f["stage"]), f.get("theme", ""),
                                                    f.get("version", 0), f.get("movie", "")))

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "seconds": round(self.seconds, 3), "exit_code": self.exit_code,
                "movies": {"requested": self.requested, "finished": len(self.finished),
                           "failed": len(self.failures)},
                "stages": {k: v.as_dict() for k, v in self.stages.items()}, "llm": self.llm,
                "dataset": self.dataset, "finished": self.finished, "failures": self.ordered_failures()}


# --- stamps: which inputs a file was made from ----------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class _Stamps:
    def __init__(self, out: Path, kind: str):
        self.dir = Path(out) / ".make" / kind

    def get(self, name: str) -> str | None:
        try:
            return (self.dir / f"{name}.json").read_text(encoding="utf-8").strip()
        except OSError:
            return None

    def set(self, name: str, digest: str) -> None:
        atomic_write_text(self.dir / f"{name}.json", digest + "\n")

    def drop(self, name: str) -> None:
        (self.dir / f"{name}.json").unlink(missing_ok=True)


def _names_files(path: Path) -> bool:
    """Whether the plan file at `path` names a file or folder (an embedding, a LoRA, a refiner or VAE)."""
    try:
        return bool(absolute_plan_paths(json.loads(path.read_text(encoding="utf-8")), path.parent)[1])
    except (OSError, ValueError):
        return False


def _request_digest(req: planner.PlanRequest) -> str:
    return _digest(dataclasses.asdict(req))


def _qa_digest(movie: Movie, job: MakeJob) -> str:
    return _digest({"movie": movie.model_dump(mode="json"), "source": job.qa_source, "plot": job.plot_questions,
                    "derived": job.derived_limit})


# --- the job ------------------------------------------------------------------------------------------------------


def make(job: MakeJob, run: RunConfig, client: LLMClient, executor: Executor,
         progress: MakeProgress | None = None, on_failure: Callable[[dict[str, Any]], None] | None = None
         ) -> MakeReport:
    """Run the whole job (see the module docstring); failures are isolated per movie and listed in the report
    (and in OUT/make.json). `run.out` is replaced by OUT/movies."""
    return _Make(job, run, client, executor, progress or MakeProgress(), on_failure).run()


class _Make:
    def __init__(self, job: MakeJob, run: RunConfig, client: LLMClient, executor: Executor,
                 progress: MakeProgress, on_failure: Callable[[dict[str, Any]], None] | None):
        self.job, self.client, self.executor, self.progress = job, client, executor, progress
        self.out = Path(job.out)
        self.movies_dir = self.out / "movies"
        self.run_config = run.changed(out=self.movies_dir)
        self.report = MakeReport(self.out, requested=len(job.requests))
        self.on_failure = on_failure
        self.events: queue.Queue[tuple[str, Any, Future]] = queue.Queue()
        self.movie_of: dict[planner.PlanRequest, Movie] = {}  # plan ready
        self.qa_records: dict[str, dict[str, Any]] = {}  # movie id -> its QA record: finished
        self.ready: list[tuple[planner.PlanRequest, Path]] = []  # plans not yet given to the renderer
        self.pending = {"plan": 0, "qa": 0}  # LLM items submitted and not yet handled
        self.pool: ThreadPoolExecutor | None = None

    def run(self) -> MakeReport:
        t0 = time.perf_counter()
        check_output_folder(self.out)
        write_plan = self._prepare_plans()
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.client.config.concurrency), thread_name_prefix="llm")
        try:
            for req in self.job.requests:
                self._submit("plan", lambda r=req: write_plan(r), req)
            self._stream()
        except BaseException:
            self.pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: requests not started are dropped
            raise
        self.pool.shutdown()
        self._export()
        self.report.seconds = time.perf_counter() - t0
        self.report.stages = self.progress.snapshot()
        self.report.llm = self.client.usage.as_dict()
        self._write_gallery()
        atomic_write_text(self.out / "make.json", json.dumps(self.report.as_dict(), indent=2) + "\n")
        return self.report

    # 1. plans -----------------------------------------------------------------------------------------------

    def _prepare_plans(self) -> Callable[[planner.PlanRequest], planner.PlanOutcome]:
        """Drop plan files made for other requests (e.g. another --frames), then stamp every request: from here on
        a plan file on disk always answers its stamp's request."""
        plans_dir, stamps = self.out / "plans", _Stamps(self.out, "plans")
        for req in self.job.requests:
            digest = _request_digest(req)
            # A plan here is make's own, written from an LLM's reply: one that names files was not (an older
            # release's, or edited), and is planned again.
            if stamps.get(req.stem) not in (None, digest) or _names_files(plans_dir / f"{req.stem}.json"):
                (plans_dir / f"{req.stem}.json").unlink(missing_ok=True)
            stamps.set(req.stem, digest)
        # After the drops: the writer's registry of taken movie ids must not count the dropped plans.
        return planner.plan_writer(self.client, plans_dir, self.job.max_tries)

    def _plan_done(self, req: planner.PlanRequest, outcome: planner.PlanOutcome) -> None:
        if outcome.error:
            self._fail("plan", outcome.error, theme=req.theme, version=req.version)
            return
        self.progress.count("plan", done=1, kept=int(outcome.skipped))
        self.movie_of[req] = load_plan(outcome.path)[0].movie
        self.ready.append((req, outcome.path))

    # 2.-3. styles and keyframes: the one driver ---------------------------------------------------------------

    def _render(self, group: list[tuple[planner.PlanRequest, Path]]) -> None:
        movies = [self.movie_of[req] for req, _ in group]
        t0 = time.perf_counter()
        styled = False

        def frames_done(done: int, total: int) -> None:
            nonlocal styled
            if not styled:  # the driver's first call: styles are ready and the frames to do are known
                styled = True
                self.progress.add_time("style", time.perf_counter() - t0)
                self.progress.count("render", frames_total=total)
            self.progress.count("render", frames=done)

        try:
            with self.progress.working("render"):
                summary = render(self.run_config, [path for _, path in group], frames_done, executor=self.executor)
            failures = {f["movie"]: f["reason"] for f in summary.failures}
        except UserError as exc:  # the whole group (e.g. out of memory at batch size 1)
            failures = {m.id: str(exc) for m in movies}
        for req, movie in zip((req for req, _ in group), movies):
            why = failures.get(movie.id)
            where = {"movie": movie.id, "theme": req.theme, "version": req.version}
            if why is not None and why.startswith(STYLE_FAILURE):
                self._fail("style", why, **where)
                continue
            self.progress.count("style", done=1)
            if why is not None:
                self._fail("render", why, **where)
                continue
            self.progress.count("render", done=1)
            self._submit("qa", lambda m=movie: self._qa(m), movie)

    # 4. QA ----------------------------------------------------------------------------------------------------

    def _qa(self, movie: Movie) -> tuple[dict[str, Any], bool]:
        """(the movie's QA record, whether it was already on disk)."""
        path, stamps, digest = self.movies_dir / movie.id / "qa.json", _Stamps(self.out, "qa"), _qa_digest(movie,
                                                                                                         self.job)
        if stamps.get(movie.id) == digest:
            try:
                return json.loads(path.read_text(encoding="utf-8")), True
            except (OSError, ValueError):
                pass
        stamps.drop(movie.id)
        client = self.client if self.job.qa_source != "derived" else None
        record = qa.qa_for_movie(movie, self.job.qa_job, client)
        atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        stamps.set(movie.id, digest)
        return record, False

    def _qa_done(self, movie: Movie, future: Future) -> None:
        try:
            record, kept = future.result()
        except Exception as exc:  # an invalid answer (UserError), or an OS error writing qa.json: this movie only
            self._fail("qa", reason(exc), movie=movie.id)
            return
        self.progress.count("qa", done=1, kept=int(kept))
        self.qa_records[movie.id] = record
        self._write_gallery()

    # 5. dataset -----------------------------------------------------------------------------------------------

    def _export(self) -> None:
        finished = [m.id for req in self.job.requests if (m := self.movie_of.get(req)) and m.id in self.qa_records]
        self.report.finished = finished
        if not finished:
            return
        ds_dir = self.out / "dataset"
        opts = dataclasses.replace(self.job.dataset, qa_path=ds_dir / "qa.json", movies=finished,
                                   dest=ds_dir / ("dataset.json" if self.job.dataset.format == "llava"
                                                  else "dataset.jsonl"))
        with self.progress.working("dataset"):
            try:
                qa.write_qa(opts.qa_path, [self.qa_records[m] for m in finished])
                result = export_dataset(self.movies_dir, opts)
            except UserError as exc:
                self._fail("dataset", str(exc))
                return
        for movie_id, why in result.skipped.items():  # the others are in the dataset
            self._fail("dataset", why, movie=movie_id)
        self.progress.count("dataset", done=result.movies)
        self.report.dataset = {"path": str(result.path), "records": result.records, "movies": result.movies,
                               "videos": result.videos}

    # the stream -----------------------------------------------------------------------------------------------

    def _submit(self, kind: str, work: Callable[[], Any], item: Any) -> None:
        self.pending[kind] += 1

        def timed() -> Any:
            with self.progress.working(kind):
                return work()

        future = self.pool.submit(timed)
        future.add_done_callback(lambda f: self.events.put((kind, item, f)))

    def _stream(self) -> None:
        """Render whatever plans are ready; wait for the LLM only when none is."""
        while self.pending["plan"] or self.pending["qa"] or self.ready:
            try:
                event = self.events.get(block=not self.ready)
                while True:
                    self._handle(*event)
                    event = self.events.get_nowait()
            except queue.Empty:
                pass
            if self.ready:
                # One movie per driver call: its QA can start as soon as its frames are done, while the next movie
                # renders (a movie's frames still share batches; the model and style tokens stay loaded).
                self._render([self.ready.pop(0)])

    def _handle(self, kind: str, item: Any, future: Future) -> None:
        self.pending[kind] -= 1
        if kind == "qa":
            self._qa_done(item, future)
            return
        try:
            outcome = future.result()
        except Exception as exc:  # an OS error (or a bug) in one request must not stop the others
            outcome = planner.PlanOutcome(item, error=reason(exc))
        self._plan_done(item, outcome)

    def _fail(self, stage: str, reason: str, **where: Any) -> None:
        failure = {"stage": stage, **where, "reason": reason}
        self.report.failures.append(failure)
        self.progress.count(stage, failed=1)
        if self.on_failure:
            self.on_failure(failure)

    def _write_gallery(self) -> None:
        finished = [m for req in self.job.requests if (m := self.movie_of.get(req)) and m.id in self.qa_records]
        write_gallery(self.out, [(m, self.qa_records[m.id]) for m in finished], self.report.ordered_failures())
