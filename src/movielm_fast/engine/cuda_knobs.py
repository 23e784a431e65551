"""Which lossless fast-path knobs the torch backend uses on CUDA, from what `bench.gpu` measured.

Every knob here is lossless (the same arithmetic, other kernels or launch mechanics), so its default should be
whatever was fastest, measured, not assumed. `cuda_knobs.json` beside this module holds the measured winners: one row
per (GPU, model, size, batch), written by `python -m movielm_fast.bench.gpu --knobs` (bench/knobs.py) from a run
that timed each knob on its own against the default. A knob left unset in the config (None, or "auto" for the SDPA
backend) takes the table's value for the model's architecture on the closest GPU -- but only a value that was as
fast as the fastest at every measured batch size of that architecture, because these knobs are set once per process,
not per batch; where no value was, or nothing was measured, the built-in default stays. Flags always win.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("cuda_knobs.json")
TABLE_FORMAT = "movielm-fast/cuda-knobs@1"

BUILT_IN = {"cuda_graphs": True, "sdpa_backend": "auto", "cudnn_benchmark": False}
"""Defaults where the table says nothing. CUDA graphs: on -- they were faster at every batch size measured on a GPU
for SD 1.5-arch and SDXL-arch (bench/RESULTS.md, the GPU sections)."""


@lru_cache(maxsize=4)
def load_table(path: Path = TABLE) -> tuple[dict[str, Any], ...]:
    """The table's rows; none when the file is missing or not ours (a broken table must not stop a render)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ()
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        return ()
    return tuple(r for r in data.get("rows", []) if isinstance(r, dict) and isinstance(r.get("knobs"), dict))


def measured_knobs(kind: str, gpu: str, rows: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
    """The knob values that were as fast as the fastest at every measured batch size of an architecture (`kind`:
    "sd" or "sdxl"), from the rows of this GPU model if there are any, else from every GPU's rows. Where several
    values always tied, the built-in default is kept."""
    rows = load_table() if rows is None else rows
    mine = [r for r in rows if r.get("kind") == kind]
    mine = [r for r in mine if r.get("gpu") == gpu] or mine
    agreed: dict[str, Any] = {}
    for knob, default in BUILT_IN.items():
        common: set[str] | None = None
        for r in mine:
            values = {json.dumps(k.get(knob, default)) for k in r.get("as_fast") or [r["knobs"]]}
            common = values if common is None else common & values
        if common:
            agreed[knob] = default if json.dumps(default) in common else json.loads(sorted(common)[0])
    return agreed


def resolve(config_values: dict[str, Any], kind: str, gpu: str,
            rows: tuple[dict[str, Any], ...] | None = None) -> dict[str, Any]:
    """Each knob: the config's value if set, else the measured one, else the built-in default."""
    measured = measured_knobs(kind, gpu, rows)
    out = {}
    for knob, default in BUILT_IN.items():
        value = config_values.get(knob)
        out[knob] = measured.get(knob, default) if value is None or value == "auto" else value
    return out
