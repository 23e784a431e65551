"""Time to first frame: seconds per start-up phase of a run, and when its first image file reached the disk.

A run reports (`render --json`, key "startup"):

    imports          process start -> the driver starts (interpreter, torch, diffusers, transformers, the CLI)
    plan             plan files read and validated, --lora files checked, the output folder tried
    model_load       the model's files -> modules in their target dtype on their device (wall time); its parts,
                     which overlap: model_weights, model_tokenizers, content_hash
    backend_setup    the backend around the loaded modules (placement left to do, memory format, attention
                     processors, graph wrappers)
    styles           style tokens: embedding files read, styles immobilized
    tasks            every frame planned: prompts, tokenisation, seeds, resume keys, manifests read
    first_batch      the first batch rendered (first prompt encode, latents, denoise including any CUDA graph
                     capture or compile of its bucket, decode); first_prompt_encode is its prompt part
    first_write      the first batch's result -> its first image file on disk

`time_to_first_image` counts from the clock's origin: the process start for `render`, the plan's arrival for
`serve` (whose model is already loaded, so it has no imports or model_load, and `queued` is the plan's wait).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator


def process_age() -> float:
    """Seconds since this process started (the OS's start time; 0 where it cannot be read)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 -- a sandbox without /proc: no imports figure, nothing else lost
        return 0.0


class StartupClock:
    """Seconds per start-up phase, thread-safe (model parts load in threads), and the time to the first image."""

    def __init__(self, origin: float | None = None):
        self.origin = time.perf_counter() if origin is None else origin
        self.phases: dict[str, float] = {}
        self.first_image: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def since_process_start(cls) -> StartupClock:
        """A clock whose origin is this process's start; everything before now counts as `imports`."""
        age = process_age()
        clock = cls(time.perf_counter() - age)
        if age:
            clock.add("imports", age)
        return clock

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.phases[name] = self.phases.get(name, 0.0) + seconds

    def update(self, phases: dict[str, float]) -> None:
        for name, seconds in phases.items():
            self.add(name, seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def image_written(self) -> None:
        """Called by the writer after each image file: the first call sets the time to first image."""
        if self.first_image is None:
            with self._lock:
                if self.first_image is None:
                    self.first_image = time.perf_counter()

    @property
    def time_to_first_image(self) -> float | None:
        return None if self.first_image is None else self.first_image - self.origin

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            phases = {k: round(v, 4) for k, v in self.phases.items()}
        ttfi = self.time_to_first_image
        return {"phases": phases, "time_to_first_image": None if ttfi is None else round(ttfi, 3)}


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Adds the seconds of the block to times[name] (a plain dict: one thread writes it)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
