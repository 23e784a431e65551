"""`movielm-fast bench`: flags -> BenchSettings -> bench.runner. The protocol itself lives in bench/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from movielm_fast.errors import UserError
from movielm_fast.plan import SCHEDULERS


@click.command("bench", help="Time the render engine against diffusers and the hardware's matmul ceiling; write "
                             "JSON, CSV, a plot and one image per configuration, then regenerate RESULTS.md beside "
                             "the results folder.\n\nCPU defaults: 256x256, batch 1,2, 4 steps. CUDA defaults: the "
                             "model's native size, batch 1,2,4,8, 20 steps.")
@click.option("--model", default="demo", show_default=True,
              help="demo | sd15-arch | sdxl-arch (real architecture, random weights, built once into the cache) | "
                   "flux-arch | klein-arch (FLUX.1 [dev], FLUX.2 [klein] 4B: real architecture, random weights, built "
                   "in memory on the device) | tiny-flux | tiny-klein | a local diffusers folder or .safetensors "
                   "file.")
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
@click.option("--scheduler", type=click.Choice(SCHEDULERS),
              help="Default: the model family's (FLUX: its own flow-matching one), else dpmpp.")
@click.option("--guidance", type=float, help="Default: the model family's (FLUX.1 [dev] 3.5, FLUX.2 [klein] 4.0, "
                                            "distilled 1.0), else 7.5.")
@click.option("--no-baseline", is_flag=True, help="Skip diffusers' pipeline (no speed-up figures).")
@click.option("--out", default=Path("bench/results"), type=click.Path(path_type=Path), show_default=True)
@click.option("--machine", help="Name for file names and the RESULTS.md section (default: from the CPU/GPU model).")
@click.option("--no-report", is_flag=True, help="Do not regenerate RESULTS.md (in the parent of --out).")
@click.option("--host", is_flag=True, help="Instead: the engine's own host-side throughput on the zero-cost null "
                                           "backend (bench/host.py; 64 frames, 256 and 512 px, PNG and JPEG, "
                                           "pipelined vs sequential writes; --sizes/--steps/--batch-sizes apply).")
@click.option("--cpu-bf16", is_flag=True, help="Instead: one frame in fp32 and in bf16 on this CPU (our torch "
                                               "backend; --model, default sd15-arch, --sizes, --steps, --repeats "
                                               "apply); stores the speed-up and PSNR that --dtype auto quotes.")
def bench_cmd(model, backends, device, dtype, sizes, batch_sizes, steps, repeats, warmup, scheduler, guidance,
              no_baseline, out, machine, no_report, host, cpu_bf16):
    # Imported on use: torch and diffusers take seconds to import, and every `movielm-fast` command (--help too)
    # loads this module.
    from movielm_fast.bench import host as host_bench
    from movielm_fast.bench.report import write_results_md
    from movielm_fast.bench.runner import BenchSettings, run_bench
    from movielm_fast.export.specs import parse_batch_sizes, parse_sizes

    if cpu_bf16:
        from movielm_fast.bench.cpu_bf16 import measure

        size = parse_sizes(sizes)[0][0] if sizes else 256
        try:
            measure("sd15-arch" if model == "demo" else model, size, steps or 4, repeats,
                    log=lambda msg: click.echo(msg, err=True))
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        return
    if host:
        argv = ["--results", str(out)] + (["--steps", str(steps)] if steps else [])
        argv += ["--sizes", ",".join(str(w) for w, _ in parse_sizes(sizes))] if sizes else []
        argv += ["--batch", str(parse_batch_sizes(batch_sizes)[0])] if batch_sizes else []
        host_bench.main(argv)
        if not no_report:
            click.echo(f"report: {write_results_md(out, Path(out).parent / 'RESULTS.md')}")
        return

    names = None if backends.strip() == "all" else [b.strip() for b in backends.split(",") if b.strip()]
    try:
        settings = BenchSettings(model=model, backends=names, device=device, dtype=dtype,
                                 sizes=list(parse_sizes(sizes)) if sizes else None,
                                 batch_sizes=list(parse_batch_sizes(batch_sizes)) if batch_sizes else None,
                                 steps=steps, repeats=repeats, warmup=warmup, guidance=guidance, scheduler=scheduler,
                                 baseline=not no_baseline, out=out, machine=machine)
        run = run_bench(settings, log=lambda msg: click.echo(msg, err=True))
    except UserError as exc:
        # Standalone use (tests, `python -m`) has no CleanErrors group around it: keep the one-line message.
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    for kind, path in run.files.items():
        click.echo(f"{kind}: {path}")
    if not no_report:
        click.echo(f"report: {write_results_md(out, Path(out).parent / 'RESULTS.md')}")


if __name__ == "__main__":  # `python -m movielm_fast.cli.bench_cmds` from the repository root
    bench_cmd()
