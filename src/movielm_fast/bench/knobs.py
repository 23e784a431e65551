"""The CUDA knob table (engine/cuda_knobs.json) from bench results: which lossless knobs were fastest, per row.

    python -m movielm_fast.bench.knobs [--results bench/results] [--table src/movielm_fast/engine/cuda_knobs.json]

For each fp16 CUDA result, each (size, batch) gives one row: the fastest of our torch entries ("torch" and its
variants such as "torch+no-cuda_graphs", "torch+sdpa_backend=flash") and the knob values of every entry within
`MARGIN` of it (`as_fast`: closer than that is noise, so any of them may be chosen). Knob values are those the run
recorded, or for results written before runs recorded them, the defaults of that time with the variant's options.
Later results replace earlier rows of the same GPU, model, size and batch. `bench.gpu --knobs` runs this at its end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from movielm_fast.engine.cuda_knobs import BUILT_IN, TABLE, TABLE_FORMAT
from movielm_fast.paths import atomic_write_text

from .args import bench_parser
from .report import load_results
from .runner import backend_variant

MARGIN = 0.02
LEGACY_DEFAULTS = {"cuda_graphs": False, "sdpa_backend": "auto", "cudnn_benchmark": False}
"""The torch backend's knob values before results recorded them (CUDA graphs were opt-in then)."""


def run_knobs(run: dict[str, Any]) -> dict[str, Any]:
    if isinstance(run.get("knobs"), dict):
        return {k: run["knobs"][k] for k in BUILT_IN if k in run["knobs"]}
    _, opts = backend_variant(run["backend"])
    return {**LEGACY_DEFAULTS, **{k: v for k, v in opts.items() if k in BUILT_IN}}


def knob_rows(result: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """One row per (size, batch) of an fp16 CUDA result that timed our default torch entry."""
    st = result["settings"]
    if st.get("device") != "cuda" or st.get("dtype") != "fp16":
        return []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in result["runs"]:
        if r["status"] == "ok" and r["backend"].split("+")[0] == "torch":
            groups.setdefault((r["size"], r["batch"]), []).append(r)
    rows = []
    for (size, batch), runs in sorted(groups.items()):
        if not any(r["backend"] == "torch" for r in runs):
            continue
        frame = {r["backend"]: r["stages"]["frame"]["median"] for r in runs}
        best = min(runs, key=lambda r: frame[r["backend"]])
        # Entries within MARGIN of the fastest are as good as it: closer than that is noise.
        near = [r for r in runs if frame[r["backend"]] <= frame[best["backend"]] * (1 + MARGIN)]
        rows.append({"gpu": result["machine"].get("gpu_model"), "model": st["model"], "kind": st.get("model_kind"),
                     "size": size, "batch": batch, "dtype": "fp16", "default_s_per_frame": round(frame["torch"], 4),
                     "winner": best["backend"], "winner_s_per_frame": round(frame[best["backend"]], 4),
                     "knobs": run_knobs(best), "as_fast": [run_knobs(r) for r in near], "source": source})
    return rows


def build_table(results_dir: Path) -> dict[str, Any]:
    rows: dict[tuple, dict[str, Any]] = {}
    for path, result in load_results(results_dir):  # oldest first: later measurements replace earlier ones
        for row in knob_rows(result, f"bench/results/{path.name}"):
            rows[(row["gpu"], row["model"], row["size"], row["batch"])] = row
    return {"format": TABLE_FORMAT, "generated_by": "python -m movielm_fast.bench.knobs",
            "rows": sorted(rows.values(), key=lambda r: (r["gpu"] or "", r["model"], r["size"], r["batch"]))}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("knobs", __doc__, results="--results")
    ap.add_argument("--table", type=Path, default=TABLE, help="where to write the table (default: the package's)")
    args = ap.parse_args(argv)
    table = build_table(args.results)
    atomic_write_text(args.table, json.dumps(table, indent=1) + "\n")
    print(f"{len(table['rows'])} row(s) -> {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
