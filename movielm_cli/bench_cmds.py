"""`movielm-fast bench`: flags -> BenchSettings -> bench.runner. The protocol itself lives in bench/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.errors import UserError


def _int_list(value: str | None, flag: str) -> list[int] | None:
    if not value:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,2,4, got {value!r}",
                                 param_hint=flag) from None
    if not out or min(out) < 1:
        raise click.BadParameter("every value must be a positive integer", param_hint=flag)
    return out


def _sizes(value: str | None) -> list[tuple[int, int]] | None:
    if not value:
        return None
    sizes = []
    for part in value.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) % 8 or int(h) % 8 or not int(w) or not int(h):
            raise click.BadParameter(f"{part!r}: use WIDTHxHEIGHT with multiples of 8, e.g. 512x512",
                                     param_hint="--sizes")
        sizes.append((int(w), int(h)))
    return sizes


@click.command("bench", help="Time the render engine against diffusers and the hardware's matmul ceiling; write "
                             "JSON, CSV, a plot and one image per configuration, then regenerate RESULTS.md beside "
                             "the results folder.\n\nCPU defaults: 256x256, batch 1,2, 4 steps. CUDA defaults: the "
                             "model's native size, batch 1,2,4,8, 20 steps.")
@click.option("--model", default="demo", show_default=True,
              help="demo | sd15-arch | sdxl-arch (real architecture, random weights, built once into the cache) | "
                   "a local diffusers folder or .safetensors file.")
@click.option("--backend", "backends", default="all", show_default=True,
              help="Comma-separated backends (torch,onnxruntime,...) or 'all' registered ones; missing ones are "
                   "skipped with a note.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--dtype", default="auto", show_default=True, help="auto | fp32 | fp16 | bf16")
@click.option("--sizes", help="Comma-separated WIDTHxHEIGHT, e.g. 256x256,512x512.")
@click.option("--batch-sizes", help="Comma-separated frames per batch, e.g. 1,2,4,8; stops at the first that does "
                                    "not fit.")
@click.option("--steps", type=click.IntRange(1), help="Denoising steps per frame.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed repeats per figure.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--scheduler", default="dpmpp", show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--no-baseline", is_flag=True, help="Skip diffusers' pipeline (no speed-up figures).")
@click.option("--out", default=Path("bench/results"), type=click.Path(path_type=Path), show_default=True)
@click.option("--machine", help="Name for file names and the RESULTS.md section (default: from the CPU/GPU model).")
@click.option("--no-report", is_flag=True, help="Do not regenerate RESULTS.md (in the parent of --out).")
def bench_cmd(model, backends, device, dtype, sizes, batch_sizes, steps, repeats, warmup, scheduler, guidance,
              no_baseline, out, machine, no_report):
    try:
        from bench.report import write_results_md
        from bench.runner import BenchSettings, run_bench
    except ModuleNotFoundError as exc:
        if exc.name != "bench":
            raise
        click.echo("error: the bench package is not importable from this install\n  fix: add \"bench*\" to "
                   "[tool.setuptools.packages.find] include in pyproject.toml and reinstall (pip install -e .), "
                   "or run from the repository root: python -m movielm_cli.bench_cmds", err=True)
        sys.exit(2)
    from engine.plan import SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise click.BadParameter(f"choose one of: {', '.join(SCHEDULERS)}", param_hint="--scheduler")
    names = None if backends.strip() == "all" else [b.strip() for b in backends.split(",") if b.strip()]
    settings = BenchSettings(model=model, backends=names, device=device, dtype=dtype, sizes=_sizes(sizes),
                             batch_sizes=_int_list(batch_sizes, "--batch-sizes"), steps=steps, repeats=repeats,
                             warmup=warmup, guidance=guidance, scheduler=scheduler, baseline=not no_baseline,
                             out=out, machine=machine)
    try:
        run = run_bench(settings, log=lambda msg: click.echo(msg, err=True))
    except UserError as exc:
        # Standalone use (tests, `python -m`) has no CleanErrors group around it: keep the one-line message.
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    for kind, path in run.files.items():
        click.echo(f"{kind}: {path}")
    if not no_report:
        click.echo(f"report: {write_results_md(out, Path(out).parent / 'RESULTS.md')}")


if __name__ == "__main__":  # `python -m movielm_cli.bench_cmds` from the repository root
    bench_cmd()
