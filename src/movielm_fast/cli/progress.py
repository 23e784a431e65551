"""The render command's progress display (rich): one line per stage as it finishes, a frames bar, and the steps of
the batch in flight, as diffusers, A1111 and ComfyUI show them. `--quiet` and `--json` show none of it."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

LABELS = {"validate": "checking the plans", "load": "loading the model", "styles": "preparing styles",
          "render": "rendering", "write": "writing files"}


class RenderDisplay:
    """The engine's progress object (run.driver.Progress): called with frames, told stages and steps."""

    def __init__(self, bar):
        self.bar = bar
        self.frames = bar.add_task(LABELS["validate"], total=None)
        self.steps = bar.add_task("  steps of this batch", total=None, visible=False)
        self.current: str | None = None
        self.started = time.perf_counter()

    def stage(self, name: str) -> None:
        self._finish()
        self.current, self.started = name, time.perf_counter()
        self.bar.update(self.frames, description=LABELS.get(name, name))
        if name != "render":
            self.bar.update(self.steps, visible=False)

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(self.frames, total=total, advance=done)
        if done:  # a batch finished: the next one starts from step 0
            self.bar.reset(self.steps, visible=False)

    def step(self, done: int, total: int) -> None:
        self.bar.update(self.steps, total=total, completed=done, visible=True)

    def close(self, outcome: str = "done") -> None:
        """The last stage's line with its `outcome` (done, failed, interrupted). After a failure nothing half-drawn
        stays above the error: the bars are hidden."""
        self._finish(outcome)
        self.current = None
        self.bar.update(self.frames, description="frames", visible=outcome == "done")
        self.bar.update(self.steps, visible=False)

    def _finish(self, outcome: str = "done") -> None:
        if self.current is not None:
            self.bar.console.print(f"{LABELS.get(self.current, self.current)}: {outcome} "
                                   f"{'in' if outcome == 'done' else 'after'} {time.perf_counter() - self.started:.1f} s")


@contextmanager
def progress_display(quiet: bool) -> Iterator[RenderDisplay | None]:
    """The display for a render (the driver's progress object), or None under --quiet / --json."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as bar:
        display = RenderDisplay(bar)
        try:
            yield display
        except KeyboardInterrupt:
            display.close("interrupted")
            raise
        except BaseException:
            display.close("failed")
            raise
        display.close()


@contextmanager
def step_display(label: str, total: int, quiet: bool) -> Iterator[Callable[[int, float], None] | None]:
    """A bar of `total` training steps with the latest loss (style training's `on_step(step, loss)`), or None
    under --quiet / --json."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda step, loss: bar.update(task, completed=step + 1, description=f"{label} (loss {loss:.4f})")
