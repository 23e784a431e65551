"""The one render driver, for every way of running: plans -> styles -> tasks -> batches -> results -> files.

    1. plans     every plan file validated before any model loads (collect_plans)
    2. styles    each style's token: an embedding file read here, or immobilized (trained) once by the executor
    3. tasks     each movie's frames with prompts, seeds and resume keys (executor.plan); finished frames skipped
    4. batches   frames that share settings and window count, cut to the batch size; out of memory re-cuts the queue
    5. results   the executor (local process or Ray workers) renders batches and returns typed results
    6. files     the writer stage encodes and writes frames, manifests and storyboards while rendering goes on

Resume, grouping, the out-of-memory policy, progress, manifests and failure isolation live here and nowhere else:
a movie whose input is bad, or whose frames fail to render, is reported in the summary and the others complete.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.families import family_by_kind, family_of_spec
from movielm_fast.engine.lora import check_lora_file
from movielm_fast.engine.oom import smaller
from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model
from movielm_fast.errors import PlanError, UserError
from movielm_fast.paths import atomic_write_bytes, remove_stale_temporaries
from movielm_fast.plan import LoadedMovie, load_plan

from .batching import first_frame_alone, ramp_first_batch
from .config import RunConfig
from .executors import Executor, open_executor, reason
from .images import resolve_quality
from .manifest import movie_identity, stored_identity
from .outputs import MovieOutputs
from .startup import StartupClock
from .tasks import Batch, Failed, FrameTask, Rendered, StyleToken
from .writer import Writer

log = logging.getLogger("movielm_fast")

Progress = Callable[[int, int], None]
"""progress(frames just rendered, frames to render). An object that also has `stage(name)` is told each stage as it
starts (STAGES), one with `step(done, steps)` the denoising steps of the batch in flight (local runs), and one with
`skipped(frames)` how many frames were already done (resume) before rendering starts."""
STAGES = ("validate", "load", "styles", "render", "write")


def report_stage(progress: Progress | None, name: str) -> None:
    stage = getattr(progress, "stage", None)
    if stage is not None:
        stage(name)


@dataclass
class Summary:
    frames_total: int = 0
    frames_rendered: int = 0
    frames_skipped: int = 0
    frames_failed: int = 0
    seconds: float = 0.0
    render_seconds: float = 0.0
    unet_steps: int = 0
    batch_size: int = 0
    movies: int = 0
    storyboards: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    resubmitted_batches: int = 0
    startup_seconds: float = 0.0
    write: dict[str, float] = field(default_factory=dict)
    lora_seconds: float = 0.0  # merging LoRA sets into the weights (ONNX Runtime: recreating sessions)
    startup: dict[str, Any] = field(default_factory=dict)  # run.startup: seconds per phase, time to first image

    @property
    def images_per_second(self) -> float:
        return self.frames_rendered / self.render_seconds if self.render_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {"movies": self.movies, "frames": self.frames_total, "rendered": self.frames_rendered,
             "skipped": self.frames_skipped, "failed": self.frames_failed, "seconds": round(self.seconds, 3),
             "images_per_second": round(self.images_per_second, 4),
             "unet_steps_per_second": round(self.unet_steps / max(self.render_seconds, 1e-9), 3),
             "batch_size": self.batch_size, "storyboards": self.storyboards, "failures": self.failures,
             "write": self.write}
        if self.startup:
            d["startup"] = self.startup
        if self.lora_seconds:
            d["lora_apply_seconds"] = round(self.lora_seconds, 3)
        if self.workers:
            busy = sum(w["busy_seconds"] for w in self.workers)
            idle = max(0.0, len(self.workers) * self.render_seconds - busy) / max(1, self.frames_rendered)
            d.update(workers=self.workers, resubmitted_batches=self.resubmitted_batches,
                     startup_seconds=round(self.startup_seconds, 3), idle_seconds_per_frame=round(idle, 4))
        return d


def collect_plans(paths: list[str | Path], family=None, file_roots: tuple[Path, ...] | None = None
                  ) -> list[LoadedMovie]:
    """Every movie of every plan file (a folder means all *.json in it), validated before anything is loaded.
    `family`: the model's (engine.families), whose LoRAs the plans may name; None: any family's. `file_roots`: the
    only folders the movies may read files from (LoadedMovie.file_roots)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"no plan files found in {', '.join(map(str, paths))}", "pass a plan.json or a folder of them")
    movies, bad = [], []
    for f in files:  # every file's problems in one report, not one file per run
        try:
            movies += load_plan(f)
        except PlanError as exc:
            bad.append(exc)
    if len(bad) == 1:
        raise bad[0]
    if bad:
        raise UserError("\n".join(e.message for e in bad), "fix the problems listed, then run again")
    ids = [m.movie.id for m in movies]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:  # within one file the plan validation already said so; this is across files
        raise UserError(f"movie id(s) {', '.join(map(repr, duplicated))} appear in more than one plan",
                        "movie ids name output folders; make them unique across the files you render")
    movies = [m.model_copy(update={"file_roots": file_roots}) for m in movies]
    for m in movies:
        if m.movie.style.embedding and not m.embedding_file().is_file():
            raise UserError(f"movie {m.movie.id!r}: style embedding {m.movie.style.embedding!r} not found "
                            f"(looked in {m.plan_dir})", "fix style.embedding; paths are relative to the plan file")
        for where, path, _ in m.lora_files():
            check_lora_file(path, f"movie {m.movie.id!r} {where}: LoRA", family)
        check_plan_folders(m)
    return movies


def check_plan_folders(lm: LoadedMovie) -> None:
    """A movie's render.refiner / render.vae folders must be what they claim, before any model loads."""
    from movielm_fast.engine.models import (  # diffusers: imported only when a plan names such a folder
        check_refiner,
        vae_folder,
    )

    for key, check in (("refiner", check_refiner), ("vae", vae_folder)):
        path = getattr(lm.settings, key)
        if path:
            folder = lm.confined(Path(path), f"render.{key}")  # outside the run's file roots: its own message
            try:
                check(folder)
            except UserError as exc:
                raise UserError(f"movie {lm.movie.id!r}: render.{key}: {exc.message}",
                                f"{exc.hint}; paths in a plan are relative to the plan file") from None


def check_output_folder(out: Path) -> None:
    """Fail before any model work if the output folder cannot be created or written."""
    try:
        atomic_write_bytes(Path(out) / ".movielm-write-check", b"")
        (Path(out) / ".movielm-write-check").unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {out}: {exc.strerror or exc}",
                        "choose a writable folder with --out") from None


def check_movie_owners(run: RunConfig, movies: list[LoadedMovie]) -> None:
    """A movie id already in OUT must hold the same movie (id, title and plan file: manifest.movie_identity), or
    this render would overwrite its frames; refused before anything is touched, unless --replace. Manifests from
    before identities were recorded are adopted."""
    clashes = []
    for lm in movies:
        theirs = stored_identity(run.out / lm.movie.id / "manifest.json")
        if theirs and theirs["identity"] != movie_identity(lm):
            clashes.append(f"{run.out / lm.movie.id} holds {theirs['title']!r} from {theirs['plan']}, "
                           f"not {lm.movie.title!r} from {lm.source}")
    if clashes and not run.replace:
        more = f" (and {len(clashes) - 1} more movie(s))" if len(clashes) > 1 else ""
        raise UserError(f"another movie with the same id is already rendered there: {clashes[0]}{more}",
                        "render into another --out, give the movie another id, or pass --replace to render over "
                        "it (its frames are replaced)")
    for clash in clashes:
        log.warning("--replace: %s", clash)


@dataclass
class Job:
    """A render job, validated and resolved once, at the top, before any model loads or worker starts: every movie
    of every plan file, the output folder writable, the image encoding resolved."""

    run: RunConfig
    movies: list[LoadedMovie]
    encoding: tuple[str, int | None]  # (image format, encoder quality; None for PNG)
    started: float = field(default_factory=time.perf_counter)  # the summary's seconds count from here
    clock: StartupClock = field(default_factory=StartupClock)  # run.startup: phases, time to first image

    @classmethod
    def load(cls, run: RunConfig, plan_paths: list[str | Path], clock: StartupClock | None = None, *,
             source: str | None = None, family=None, file_roots: tuple[Path, ...] | None = None) -> Job:
        """`source`: where the movies come from, for their identity in OUT (manifest.movie_identity), when the plan
        files are copies (serve's queue keeps each submission in a file of its own); default: the plan files.
        `family`: the model's family (engine.families), where it is known: a LoRA for another family fails here.
        `file_roots`: the only folders the movies may read files from (serve's --allow-files)."""
        started = time.perf_counter()
        clock = clock or StartupClock(started)
        with clock.phase("plan"):
            movies = collect_plans(plan_paths, family, file_roots)  # 1. plans
            if source is not None:
                movies = [lm.model_copy(update={"source": source}) for lm in movies]
            check_movie_owners(run, movies)  # before anything is written to OUT
            check_output_folder(run.out)
            remove_stale_temporaries(run.out)  # a killed run's (movies' own folders: MovieOutputs)
        return cls(run, movies, (run.image_format, resolve_quality(run.image_format, run.quality)), started, clock)


def render(run: RunConfig, plan_paths: list[str | Path], progress: Progress | None = None, *,
           executor: Executor | None = None, model: ModelConfig | None = None,
           clock: StartupClock | None = None) -> Summary:
    """Render every frame of every movie; frames already rendered with identical settings are skipped. The plans
    are validated first (`Job.load`); then `executor` renders them, or, without one, a local executor that loads
    `model` here (after the plans are checked). `clock`: where start-up phases count from (the CLI's: the process
    start); by default, this call."""
    report_stage(progress, "validate")
    family = family_by_kind(executor.info.kind) if executor is not None else \
        family_of_spec((model or ModelConfig()).model)
    job = Job.load(run, plan_paths, clock, family=family)
    if executor is not None:
        return render_job(job, executor, progress)
    report_stage(progress, "load")
    with open_executor(model or ModelConfig(), on_step=getattr(progress, "step", None)) as local:
        return render_job(job, local, progress)


def take_startup(executor: Executor) -> dict[str, float]:
    """The start-up phases an executor measured while loading (LocalExecutor.startup), once: a resident executor
    (serve) charges its model load to the first job only."""
    phases = getattr(executor, "startup", None) or {}
    taken = dict(phases)
    phases.clear()
    return taken


def render_job(job: Job, executor: Executor, progress: Progress | None = None) -> Summary:
    """The stages of a job already validated (`Job.load`) on a loaded executor: 2. styles, 3. tasks, 4.-6.
    batches to files. Movies that fail are in the summary; the others complete."""
    job.clock.update(take_startup(executor))  # the model's phases, for the job that waited for its load
    run = _Run(job, executor, progress)
    try:
        todo = run.prepare()  # 2.-3.
        run.render(todo)  # 4.-6.
    finally:
        run.executor.cancel()  # after an interrupt: nothing of this job keeps running
    run.summarize()
    run.summary.startup_seconds = getattr(executor, "startup_seconds", 0.0)  # Ray's workers: their start
    run.summary.seconds = time.perf_counter() - job.started
    run.summary.startup = job.clock.as_dict()
    return run.summary


def prepare_styles(run: RunConfig, movies: list[LoadedMovie], executor: Executor,
                   failures: dict[str, str]) -> dict[str, StyleToken | None]:
    """2. styles: movie id -> its style token (None: the style is written out as text). Each embedding file is read
    once; each style without one is immobilized once (MovieLLM), however many movies share it."""
    by_source: dict[tuple, StyleToken | str] = {}
    tokens: dict[str, StyleToken | None] = {}
    train = run.style_training and not executor.info.no_style_training
    if run.style_training and not train and any(not lm.movie.style.embedding for lm in movies):
        (log.info if run.quiet else log.warning)(
            "style training skipped (styles are written out as text): %s", executor.info.no_style_training)
    for lm in movies:
        st = lm.movie.style
        if st.embedding:
            try:
                key: tuple = ("file", str(lm.embedding_file().resolve()), st.token)  # confined now, as it is read
            except UserError as exc:
                failures[lm.movie.id] = str(exc)
                continue
        elif train:
            key = ("train", st.name, st.description, st.token)
        else:
            tokens[lm.movie.id] = None
            continue
        if key not in by_source:
            try:
                if key[0] == "file":
                    emb = load_embedding(key[1])
                    name = st.token or emb.token or f"<{st.name.lower().replace(' ', '-')}>"
                    by_source[key] = StyleToken(name, tuple(vectors_for_model(emb, executor.info.kind)), key[1])
                else:
                    by_source[key] = executor.train_style(st)
            except Exception as exc:
                by_source[key] = ("style training failed: " if key[0] == "train" else "") + reason(exc)
        value = by_source[key]
        if isinstance(value, str):
            failures[lm.movie.id] = value
        else:
            tokens[lm.movie.id] = value
    return _distinct_tokens(tokens)


def _distinct_tokens(tokens: dict[str, StyleToken | None]) -> dict[str, StyleToken | None]:
    """Two styles whose files carry the same token name (two libraries' <gothic>, say) cannot both be bound: the
    later one gets a name suffixed with a digest of its source."""
    owner: dict[str, str] = {}
    renamed: dict[str, StyleToken] = {}
    out: dict[str, StyleToken | None] = {}
    for movie_id, t in tokens.items():
        if t is not None and owner.setdefault(t.token, t.source) != t.source:
            if t.source not in renamed:
                digest = hashlib.sha256(t.source.encode()).hexdigest()[:6]
                renamed[t.source] = StyleToken(f"{t.token.rstrip('>')}-{digest}>", t.vectors, t.source)
            t = renamed[t.source]
        out[movie_id] = t
    return out


def make_batches(tasks: list[FrameTask], size: int) -> list[list[FrameTask]]:
    """4. Frames that share settings and window count, in plan order, cut into batches of `size`."""
    groups: dict[tuple, list[FrameTask]] = {}
    for t in tasks:
        groups.setdefault((t.settings, t.chunks), []).append(t)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


class _Run:
    """One job in progress: what the stages share (the executor, style tokens, each movie's outputs, the summary,
    why movies failed), so each stage is a method rather than a function of eight parameters."""

    def __init__(self, job: Job, executor: Executor, progress: Progress | None):
        self.job, self.run, self.executor, self.progress = job, job.run, executor, progress
        self.summary = Summary(movies=len(job.movies), frames_total=sum(len(lm.movie.frames) for lm in job.movies))
        self.failures: dict[str, str] = {}  # movie id -> why it is not complete
        self.tokens: dict[str, StyleToken | None] = {}
        self.outputs: dict[str, MovieOutputs] = {}
        self.writer: Writer | None = None
        self.first_result: float | None = None  # when the first batch came back (run.startup's first_write)

    def prepare(self) -> list[FrameTask]:
        """2. styles and 3. tasks: the frames still to render (finished ones skipped), each movie's outputs ready."""
        summary, clock = self.summary, self.job.clock
        report_stage(self.progress, "styles")
        with clock.phase("styles"):
            self.tokens = prepare_styles(self.run, self.job.movies, self.executor, self.failures)  # 2. styles
        with clock.phase("tasks"):
            tasks = self.plan_tasks()  # 3. tasks
        todo = [t for t in tasks if self.run.force or not self.outputs[t.job.movie_id].is_done(t)]
        summary.frames_skipped = len(tasks) - len(todo)
        if (skipped := getattr(self.progress, "skipped", None)) is not None:
            skipped(summary.frames_skipped)
        rendering: dict[str, list[str]] = {}
        for t in todo:
            rendering.setdefault(t.job.movie_id, []).append(t.job.frame_id)
        for movie_id, mo in self.outputs.items():
            mo.save()  # drops entries of frames no longer in the plan
            mo.expect(rendering.get(movie_id, ()))
        return todo

    def plan_tasks(self) -> list[FrameTask]:
        """3. Every frame of every movie that can be planned; each such movie's outputs (manifest, anchors)."""
        image_format, quality = self.job.encoding
        good = [lm for lm in self.job.movies if lm.movie.id not in self.failures]
        tasks: list[FrameTask] = []
        items = [(lm, self.tokens[lm.movie.id]) for lm in good]
        for lm, planned in zip(good, self.executor.plan(items, self.run.overrides)):
            if isinstance(planned, str):
                self.failures[lm.movie.id] = planned
                continue
            settings = {**planned.settings, "image_format": image_format, "quality": quality}
            mo = self.outputs[lm.movie.id] = MovieOutputs(self.run.out, lm, self.executor.info, settings, image_format)
            anchors = {a.character: a for t in planned.tasks for a in t.job.anchors}
            mo.set_anchors([anchors[c.name] for c in lm.movie.characters if c.name in anchors])
            if image_format != "png":  # another file is another output; PNG keys stay, so old runs resume
                for t in planned.tasks:
                    t.key.update(image_format=image_format, quality=quality)
            tasks += planned.tasks
        return tasks

    def render(self, todo: list[FrameTask]) -> None:
        """4.-6. Batches to the executor, results to the writer threads, until nothing is left or in flight; every
        rendered frame reaches the disk, after Ctrl-C too."""
        executor, summary = self.executor, self.summary
        self.writer = Writer(self.outputs, executor.info, encoding=self.job.encoding, threads=self.run.writer_threads,
                             on_image=self.job.clock.image_written)
        report_stage(self.progress, "render")
        size = self.run.batch_size
        if size == "auto":
            size = executor.batch_size(todo[0].settings) if todo else 1
        summary.batch_size = size
        if self.progress:
            self.progress(0, len(todo))
        queue = deque(make_batches(todo, size))
        if ramp_first_batch(self.run.batch_size, executor.info.shape_cost):
            queue = deque(first_frame_alone(list(queue)))  # the first file after one frame's work, not a batch's
        t0 = time.perf_counter()
        try:
            while queue or executor.pending:
                while queue and executor.has_room():
                    executor.submit(self.batch(queue.popleft()))
                batch, result = executor.next_result()
                if self.first_result is None:
                    self.first_result = time.perf_counter()
                    self.job.clock.add("first_batch", self.first_result - t0)
                    if isinstance(result, Rendered):
                        self.job.clock.add("first_prompt_encode", result.prompt_seconds)
                queue = self.take(batch, result, queue, len(todo))
        finally:
            summary.render_seconds = time.perf_counter() - t0
            report_stage(self.progress, "write")
            summary.workers = executor.worker_stats()
            summary.resubmitted_batches = sum(w.get("rerun_batches", 0) for w in summary.workers)
            try:
                self.writer.close()  # every rendered frame reaches the disk, after Ctrl-C too
            finally:
                for mo in self.outputs.values():
                    mo.save()
                for movie_id, why in self.writer.failures.items():
                    self.failures.setdefault(movie_id, why)

    def batch(self, frames: list[FrameTask]) -> Batch:
        """4. A batch of frames, with the style tokens their prompts use and the anchors not saved yet."""
        used = {tok.source: tok for t in frames if (tok := self.tokens[t.job.movie_id])}
        want = frozenset(a.key for t in frames for a in t.job.anchors) - self.writer.anchors_saved
        return Batch(frames, list(used.values()), self.job.encoding, want)

    def take(self, batch: Batch, result: Rendered | Failed, queue: deque, frames: int) -> deque:
        """5. A batch's result: its frames to the writer, or the failure policy (out of memory: re-cut what is left
        smaller; anything else: its frames alone, then the movie fails). Returns the queue to go on with."""
        summary = self.summary
        if isinstance(result, Rendered):
            self.writer.put(batch, result)
            summary.frames_rendered += len(batch.tasks)
            summary.lora_seconds += result.lora_seconds
            summary.unet_steps += batch.settings.steps  # UNet evaluations (each over the whole batch)
            if self.progress:
                self.progress(len(batch.tasks), frames)
        elif result.oom:
            if len(batch.tasks) == 1:
                raise UserError("out of memory even at batch size 1",
                                "use a smaller --width/--height, --dtype fp16, or a larger device")
            size = summary.batch_size = min(summary.batch_size, smaller(len(batch.tasks)))
            log.warning("out of memory at batch %d; continuing with batches of %d", len(batch.tasks), size)
            # Re-cut everything still to do, so later batches do not each fail once before shrinking.
            return deque(make_batches([t for b in [batch.tasks, *queue] for t in b], size))
        elif len(batch.tasks) > 1:
            # Render its frames alone, so one bad movie cannot take the other movies of its batch with it.
            queue.extendleft([t] for t in reversed(batch.tasks))
        else:
            self.failures.setdefault(batch.tasks[0].job.movie_id, result.reason)
        return queue

    def summarize(self) -> None:
        """The summary's storyboards, write times and failures, once every file is written."""
        summary, clock = self.summary, self.job.clock
        if self.first_result is not None and clock.first_image is not None:
            clock.add("first_write", max(0.0, clock.first_image - self.first_result))
        written = set(self.writer.times.storyboards) if self.writer else set()
        for mo in self.outputs.values():
            if mo.complete():  # complete before this run too: its dialogue may have changed
                path = str(mo.storyboard.path)
                summary.storyboards.append(path if path in written else str(mo.storyboard.write()))
        summary.write = self.writer.times.as_dict() if self.writer else {}
        for movie_id, why in self.failures.items():
            frames = next(lm.movie.frames for lm in self.job.movies if lm.movie.id == movie_id)
            done = self.outputs[movie_id].entries if movie_id in self.outputs else {}
            missing = sum(f.id not in done for f in frames)
            summary.failures.append({"movie": movie_id, "reason": why, "frames_missing": missing})
            summary.frames_failed += missing
