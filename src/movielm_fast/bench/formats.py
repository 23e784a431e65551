"""What every benchmark shares to record its result and to render its part of bench/RESULTS.md.

A benchmark module owns its result format: it writes results with `save_result` under a format string of its own,
and lists in `SECTIONS` which function turns results of that format into markdown. report.py names the modules
(`SECTION_MODULES`) and only loops over them. This module stays light (no torch) so that every benchmark, and
report.py, can import it without an import cycle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from movielm_fast.paths import atomic_write_text


@dataclass(frozen=True)
class Section:
    """One part of RESULTS.md: the results of `format` (oldest first, possibly none) -> markdown lines."""

    format: str
    render: Callable[[list[dict[str, Any]]], list[str]]


def save_result(results_dir: Path, prefix: str, result: dict[str, Any]) -> Path:
    """A small benchmark's result as results_dir/<prefix>-<stamp>.json (atomically); prints and returns the path."""
    path = Path(results_dir) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(path)
    return path


def load_note(res: dict[str, Any]) -> str:
    """The load average a result recorded at its start and end, as a clause of a section's first sentence."""
    la = res.get("load_average") or {}
    start, end = la.get("start"), la.get("end")
    return f"load average {start[0]:.2f} at the start, {end[0]:.2f} at the end" if start and end else ""


def rate(x: float | None) -> str:
    """A judged rate as a whole percent."""
    return "—" if x is None else f"{100 * x:.0f}%"


def median_text(s: dict[str, Any] | None, rng: bool = False) -> str:
    """A timing summary (median, min, max) as its median, with the min–max range in brackets if `rng`."""
    if not s:
        return "–"
    med = s["median"]
    digits = 3 if med < 10 else 1
    return f"{med:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})" if rng else f"{med:.{digits}f}"
