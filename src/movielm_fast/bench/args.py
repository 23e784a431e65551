"""The argument parser every `python -m movielm_fast.bench.X` entry point starts from.

Flags that several benchmarks share are declared here once: an entry point asks for those it takes, each with its
own default, and adds only the flags that are its own. This module stays light (no torch at import): llama_cpp,
which needs no torch, uses it too.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def bench_parser(module: str, doc: str | None, *, results: str | None = None, model: str | None = None,
                 device: bool = False, size: int | None = None, steps: int | None = None, frames: int | None = None,
                 repeats: int | None = None, guidance: float | None = None, scheduler: str | None = None,
                 helps: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m movielm_fast.bench.<module>`, described by the first paragraph of `doc`.

    A shared flag is added when its argument is given (its default then): --model, --device (cpu), --size,
    --steps, --frames, --repeats, --guidance, --scheduler, and the results folder under the flag name `results`
    names ("--results" or "--out"). `helps` gives a shared flag, named without its dashes, an entry point's own
    help text.
    """
    helps = helps or {}
    ap = argparse.ArgumentParser(prog=f"python -m movielm_fast.bench.{module}",
                                 description=doc.split("\n\n")[0] if doc else None)
    if model is not None:
        ap.add_argument("--model", default=model, help=helps.get("model"))
    if device:
        ap.add_argument("--device", default="cpu", help=helps.get("device"))
    shared = (("size", size, int), ("steps", steps, int), ("frames", frames, int), ("repeats", repeats, int),
              ("guidance", guidance, float), ("scheduler", scheduler, None))
    for name, default, kind in shared:
        if default is not None:
            ap.add_argument(f"--{name}", type=kind, default=default, help=helps.get(name))
    if results is not None:
        from .hardware import RESULTS  # hardware imports torch: only the benchmarks that write results pay for it

        ap.add_argument(results, type=Path, default=RESULTS,
                        help=helps.get(results.lstrip("-"), "folder of result JSON files"))
    return ap


def require_device(ap: argparse.ArgumentParser, device: str) -> None:
    """--device cuda on a machine without CUDA: a usage error now rather than a traceback from deep in torch."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; run it on a GPU machine "
                 "or with --device cpu")
