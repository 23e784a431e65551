"""`movielm-fast bench`: flags -> BenchSettings -> bench.runner. The protocol itself lives in bench/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from movielm_fast.engine.config import BackendConfig
from movielm_fast.errors import UserError
from movielm_fast.paths import cache_root
from movielm_fast.plan import SCHEDULERS

from .options import settings_options

RESULTS_HELP = "~/.cache/movielm-fast/bench (or $MOVIELM_CACHE/bench)"


@click.command("bench", help="Time the render engine against diffusers and the hardware's matmul ceiling; write "
                             "JSON, CSV, a plot and one image per configuration to --out. Nothing is written into "
                             "the checkout: --report regenerates a RESULTS.md (the tracked bench/RESULTS.md only "
                             "when you name it).\n\nSize, steps and guidance: the model's own where it ships "
                             "them (the demo model: 64x64, 20 steps, guidance 4; a FLUX model: its kind's steps and "
                             "guidance); otherwise on the CPU 256x256 and 4 "
                             "steps, on CUDA the native size and 20 steps, guidance 7.5. Batch sizes: 1,2 on the "
                             "CPU, 1,2,4,8 on CUDA.")
@click.option("--model", default="demo", show_default=True,
              help="demo | sd15-arch | sdxl-arch (real architecture, random weights, built once into the cache) | "
                   "flux-arch | klein-arch (FLUX.1 [dev], FLUX.2 [klein] 4B: real architecture, random weights, built "
                   "in memory on the device) | tiny-flux | tiny-klein | a local diffusers folder or .safetensors "
                   "file.")
@click.option("--backend", "backends", default="all", show_default=True,
              help="Comma-separated backends (torch,onnxruntime,...) or 'all' registered ones; missing ones are "
                   "skipped with a note.")
@settings_options(BackendConfig, "device", "dtype", "threads")
@click.option("--sizes", help="Comma-separated WIDTHxHEIGHT, e.g. 256x256,512x512.")
@click.option("--batch-sizes", help="Comma-separated frames per batch, e.g. 1,2,4,8; stops at the first that does "
                                    "not fit.")
@click.option("--steps", type=click.IntRange(1), help="Denoising steps per frame.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed repeats per figure.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS),
              help="Sampler [the model family's: a transformer family's own flow-matching one, else dpmpp].")
@click.option("--guidance", type=float, help="Classifier-free guidance scale [the model's own (FLUX.1 [dev] 3.5, "
                                            "FLUX.2 [klein] 4.0, distilled 1.0), else 7.5].")
@click.option("--no-baseline", is_flag=True, help="Skip diffusers' pipeline (no speed-up figures).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help=f"Folder for the results [{RESULTS_HELP}].")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Also regenerate this RESULTS.md from every result in --out, e.g. --out bench/results --report "
                   "bench/RESULTS.md to publish a run in the checkout.")
@click.option("--machine", help="Name for file names and the RESULTS.md section (default: from the CPU/GPU model).")
@click.option("--host", is_flag=True, help="Instead: the engine's own host-side throughput on the zero-cost null "
                                           "backend (bench/host.py; 64 frames, 256 and 512 px, PNG and JPEG, "
                                           "pipelined vs sequential writes; --sizes/--steps/--batch-sizes apply).")
@click.option("--cpu-bf16", is_flag=True, help="Instead: one frame in fp32 and in bf16 on this CPU (our torch "
                                               "backend; --model, default sd15-arch, --sizes, --steps, --repeats "
                                               "apply); stores the speed-up and PSNR that --dtype auto quotes.")
@click.option("--threads-load", is_flag=True, help="Instead: the demo plan and sd15-arch at 256x256 rendered while "
                                                   "0, 1 and 2 cores run a busy loop: the default threads, the "
                                                   "spinning wait policy, one thread and ONNX Runtime, each in a "
                                                   "fresh process (bench/threads.py; run from the checkout).")
def bench_cmd(model, backends, device, dtype, threads, sizes, batch_sizes, steps, repeats, warmup, scheduler, guidance,
              no_baseline, out, report, machine, host, cpu_bf16, threads_load):
    try:
        BackendConfig(device=device, dtype=dtype, threads=threads)  # a bad value fails here, before the imports
    except UserError as exc:
        _fail(exc)
    out = out or cache_root() / "bench"
    if threads_load:
        from movielm_fast.bench import threads as threads_bench

        path = threads_bench.main(["--results", str(out), "--repeats", str(min(repeats, 3))])
        return _report(out, report, path)
    # Imported on use: torch and diffusers take seconds to import, and every `movielm-fast` command (--help too)
    # loads this module.
    from movielm_fast.bench import host as host_bench
    from movielm_fast.bench.runner import BenchSettings, run_bench
    from movielm_fast.engine.cpu import use_threads
    from movielm_fast.export.specs import parse_batch_sizes, parse_sizes

    use_threads(threads)
    if cpu_bf16:
        from movielm_fast.bench.cpu_bf16 import measure

        size = parse_sizes(sizes)[0][0] if sizes else 256
        try:
            measure("sd15-arch" if model == "demo" else model, size, steps or 4, repeats,
                    log=lambda msg: click.echo(msg, err=True))
        except UserError as exc:
            _fail(exc)
        return
    if host:
        argv = ["--results", str(out)] + (["--steps", str(steps)] if steps else [])
        argv += ["--sizes", ",".join(str(w) for w, _ in parse_sizes(sizes))] if sizes else []
        argv += ["--batch", str(parse_batch_sizes(batch_sizes)[0])] if batch_sizes else []
        host_bench.main(argv)
        return _report(out, report)

    names = None if backends.strip() == "all" else [b.strip() for b in backends.split(",") if b.strip()]
    try:
        settings = BenchSettings(model=model, backends=names, device=device, dtype=dtype, threads=threads,
                                 sizes=list(parse_sizes(sizes)) if sizes else None,
                                 batch_sizes=list(parse_batch_sizes(batch_sizes)) if batch_sizes else None,
                                 steps=steps, repeats=repeats, warmup=warmup, guidance=guidance, scheduler=scheduler,
                                 baseline=not no_baseline, out=out, machine=machine)
        run = run_bench(settings, log=lambda msg: click.echo(msg, err=True))
    except UserError as exc:
        _fail(exc)
    for kind, path in run.files.items():
        click.echo(f"{kind}: {path}")
    _report(out, report)


def _fail(exc: UserError) -> None:
    # Standalone use (tests, `python -m`) has no CleanErrors group around it: keep the one-line message.
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _report(out: Path, report: Path | None, path: Path | None = None) -> None:
    """Where the results went, and the RESULTS.md regenerated from them when --report names one."""
    if path is not None:
        click.echo(f"json: {path}")
    if report is None:
        click.echo(f"results in {out}; --report FILE (or `python -m movielm_fast.bench.report --results {out} --out "
                   "FILE`) makes a RESULTS.md of them")
        return
    from movielm_fast.bench.report import write_results_md

    click.echo(f"report: {write_results_md(out, report)}")


if __name__ == "__main__":  # `python -m movielm_fast.cli.bench_cmds` from the repository root
    bench_cmd()
