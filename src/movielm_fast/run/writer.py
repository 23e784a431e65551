"""The write stage: pixels, image encoding, hashing, atomic writes, manifest entries and storyboards, off the render
thread.

The driver hands each finished batch to `Writer.put` and goes straight back to rendering; a bounded pool of
threads does the files, starting with each frame's uint8 pixels (engine.frames: the GPU's copy waited for, or the
CPU's floats converted). numpy, zlib (PNG), libwebp, libjpeg (when it writes to a file descriptor: see
`images._saved`) and sha256 release the GIL while they work, so the threads run in parallel with each other and
with the render loop; they run at a lower priority than it. Backpressure: at most `max_batches` batches wait or are
being written; `put` blocks beyond that, so memory stays bounded however fast the GPU is. A batch's slot frees once
its frames are written: a movie's manifest and storyboard, due after its last frame, are written outside it, so the
render thread does not wait for them at a movie boundary.

`threads=0` writes inline on the caller's thread: the sequential reference the pipelined writer is tested against.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_bytes

from .executors import reason
from .images import encode_image
from .outputs import MovieOutputs
from .storyboard import thumbnail
from .tasks import Batch, ModelInfo, Rendered

log = logging.getLogger("movielm_fast")


# How much lower the writer threads' scheduling priority is than the render thread's. Where cores are scarce the
# render thread (which feeds the GPU) must not queue behind image encoders; the writers still get every cycle it
# leaves, and backpressure stops them falling behind for good. On 2 cores (512², null backend, bench.host) the
# render thread's time per PNG frame fell as much at niceness 5 as at 10; 5 starves the writers less when other
# processes compete for the cores.
WRITER_NICENESS = 5


def _yield_to_render(niceness: int) -> None:
    """Lower this thread's priority. Linux only: there a thread is a task with its own nice value (elsewhere
    setpriority on this id would renice the whole process)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness + os.getpriority(os.PRIO_PROCESS, 0))
        except OSError:  # not permitted (a sandbox): the writers just compete on equal terms
            pass


@dataclass
class WriteTimes:
    """Seconds per part of the write stage, summed over frames (threads overlap, so the sum can exceed wall time),
    and the render thread's waits for a free slot (backpressure)."""

    pixels: float = 0.0  # each frame's uint8 pixels: converted from the CPU's floats, or the GPU's copy waited for
    encode: float = 0.0
    hash: float = 0.0
    write: float = 0.0  # the frame file, atomically
    manifest: float = 0.0  # its journal line
    storyboard: float = 0.0
    waited: float = 0.0
    frames: int = 0
    storyboards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {"frames": self.frames, **{f"{k}_seconds": round(getattr(self, k), 4) for k in (
            "pixels", "encode", "hash", "write", "manifest", "storyboard", "waited")}}


class Writer:
    def __init__(self, outputs: dict[str, MovieOutputs], info: ModelInfo, *, encoding: tuple[str, int | None],
                 threads: int, max_batches: int = 2, on_image: Callable[[], None] | None = None):
        """`encoding`: (image format, quality) as the driver resolved them (images.resolve_quality). `on_image`:
        called after each frame file is on disk (run.startup's time to first image)."""
        self.outputs, self.info = outputs, info
        self.on_image = on_image
        self.image_format, self.quality = encoding
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="movielm-writer", initializer=_yield_to_render,
                                       initargs=(WRITER_NICENESS,)) if threads > 0 else None
        self.slots = threading.BoundedSemaphore(max(1, max_batches))
        self.times = WriteTimes()
        self.failures: dict[str, str] = {}  # movie id -> why one of its frames could not be written
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._storyboarded: set[str] = set()
        # Keys of the character anchors whose images are on disk: from earlier runs, then as they are saved.
        self.anchors_saved = {a.key for mo in outputs.values() for a in mo.anchor_specs if mo.anchor_saved(a)}

    def put(self, batch: Batch, result: Rendered) -> None:
        """Write the batch's frames (in the background when there are threads). Raises the first error a writer
        thread met (disk full, permissions), so the driver stops rendering frames it could not save."""
        self.raise_errors()
        for spec, image in result.anchors:  # consistency mode: each anchor's image is saved once
            if spec.key not in self.anchors_saved:
                try:
                    self.outputs[spec.movie_id].write_anchor(spec, image)
                except (UserError, OSError) as exc:  # its movie fails; the other movies go on
                    with self._lock:
                        self.failures.setdefault(spec.movie_id, f"cannot save the anchor of {spec.character!r}: "
                                                                f"{reason(exc)}")
                self.anchors_saved.add(spec.key)
        if self.pool is None:
            self._write_batch(batch, result)
            return
        t0 = time.perf_counter()
        self.slots.acquire()  # blocks while `max_batches` batches are still being written
        self.times.waited += time.perf_counter() - t0
        remaining = [len(batch.tasks)]

        def frame_written() -> None:
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self.slots.release()

        def write(i: int) -> None:
            try:
                finished = self._write_frame(batch, result, i)
            finally:
                frame_written()
            # The batch's slot is free before its movie's manifest and storyboard are written: at a movie boundary
            # the render thread must not wait for a contact sheet to hand over the next batch.
            if finished is not None:
                self.finish_movie(finished)

        try:
            futures = [self.pool.submit(write, i) for i in range(len(batch.tasks))]
        except BaseException:
            self.slots.release()
            raise
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + futures

    def _write_batch(self, batch: Batch, result: Rendered) -> None:
        for i in range(len(batch.tasks)):
            if (finished := self._write_frame(batch, result, i)) is not None:
                self.finish_movie(finished)

    def _write_frame(self, batch: Batch, result: Rendered, i: int) -> MovieOutputs | None:
        """One frame's file and manifest entry; its movie's outputs when it was the movie's last frame (the caller
        then writes the movie's manifest and storyboard: `finish_movie`)."""
        task = batch.tasks[i]
        mo = self.outputs[task.job.movie_id]
        t0 = time.perf_counter()
        # 1. The pixels (engine.frames: converted here on the CPU, waited for here on a GPU), then encode them (Ray
        # workers send frames already encoded).
        try:
            image = result.images[i] if result.images is not None else None
        except FloatingPointError as exc:  # this frame overflowed: its movie fails, the batch's other frames stay
            with self._lock:
                self.failures.setdefault(task.job.movie_id, reason(exc, self.info.dtype))
            return None
        tp = time.perf_counter()
        data = result.encoded[i] if result.encoded is not None else encode_image(image, task, self.info,
                                                                                 self.image_format, self.quality)
        t1 = time.perf_counter()
        # 2. Hash, 3. write the file atomically.
        sha = hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        atomic_write_bytes(mo.dir / mo.frame_file(task), data)
        t3 = time.perf_counter()
        if self.on_image is not None:
            self.on_image()
        # 4. Its storyboard thumbnail, from the pixels at hand (frames from workers are read back from their files);
        # the sheet encodes each row of thumbnails as soon as it is complete.
        mo.storyboard.add(task.job.frame_id, thumbnail(Image.fromarray(image)) if image is not None else None)
        t4 = time.perf_counter()
        # 5. Only now its manifest entry: a frame is in the manifest once its file is on disk.
        mo.record(task, sha, result.seconds / len(batch.tasks))
        t5 = time.perf_counter()
        with self._lock:
            self.times.pixels += tp - t0
            self.times.encode += t1 - tp
            self.times.hash += t2 - t1
            self.times.write += t3 - t2
            self.times.storyboard += t4 - t3
            self.times.manifest += t5 - t4
            self.times.frames += 1
            finished = mo.complete() and task.job.movie_id not in self._storyboarded
            if finished:
                self._storyboarded.add(task.job.movie_id)
        return mo if finished else None  # the movie's last frame: its manifest and storyboard now, not at the end

    def finish_movie(self, mo: MovieOutputs) -> None:
        t0 = time.perf_counter()
        mo.save()
        path = mo.storyboard.write()
        with self._lock:
            self.times.storyboard += time.perf_counter() - t0
            self.times.storyboards.append(str(path))

    def raise_errors(self) -> None:
        with self._lock:
            failed = [f for f in self._futures if f.done() and f.exception() is not None]
        if failed:
            raise failed[0].exception()

    def close(self) -> None:
        """Finish every queued write (after Ctrl-C too: frames already rendered are cheap to keep), then raise the
        first error a writer thread met."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.raise_errors()
