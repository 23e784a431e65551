"""`movielm-fast`: parse flags -> one config object -> call engine/export. No logic worth testing on its own."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from engine.errors import UserError
from engine.outputs import IMAGE_FORMATS
from engine.plan import CONSISTENCY_MODES, RenderSettings
from engine.schedulers import SCHEDULERS
from movielm_cli.clean_errors import CleanErrors

DEMO_NOTE = ("The default model 'demo' is a tiny Stable-Diffusion-architecture model with RANDOM weights: its images "
             "are not meaningful. It exists so the whole pipeline runs offline in seconds; pass --model PATH for real "
             "images.")


@click.group(cls=CleanErrors, help="movielm-fast: movie plans -> consistent keyframes -> long-video training data.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (cache hits, batch sizes).")
def cli(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advisory warnings that drown our own progress and summary."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers"):
        if name in sys.modules:  # already imported (tests): set it on the live loggers too
            lib_logging = __import__(f"{name}.utils.logging", fromlist=["x"])
            lib_logging.set_verbosity_error()
            lib_logging.disable_progress_bar()


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter("must be a positive integer or 'auto'")
    return int(value)


@cli.command("render",
             help="Render every frame of the plan(s): PLAN is a plan.json or a folder of them.\n\n" + DEMO_NOTE)
@click.argument("plans", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", default="demo", show_default=True, help="'demo', a diffusers folder or a .safetensors file.")
@click.option("--out", default=Path("out"), type=click.Path(path_type=Path), show_default=True)
@click.option("--backend", default="torch", show_default=True,
              help="torch | onnxruntime | tensorrt | null (measures the engine's own work; no real images)")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--dtype", default="auto", show_default=True, help="auto | fp32 | fp16 | bf16")
@click.option("--batch-size", default="auto", show_default=True, help="Frames per batch, or 'auto'.")
@click.option("--attention", default="sdpa", show_default=True, help="sdpa | triton | xformers")
@click.option("--cuda-graphs", is_flag=True, help="Replay the UNet step as a CUDA graph per (batch, size) bucket.")
@click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNet step (slow first call).")
@click.option("--steps", type=int)
@click.option("--width", type=int)
@click.option("--height", type=int)
@click.option("--guidance", type=float)
@click.option("--scheduler", type=click.Choice(SCHEDULERS))
@click.option("--seed", type=int)
@click.option("--negative-prompt")
@click.option("--image-format", type=click.Choice(sorted(IMAGE_FORMATS)), default="png", show_default=True,
              help="Frame files: png (lossless) | jpg | webp (lossy, ~10x smaller, ~15x faster to encode).")
@click.option("--quality", type=click.IntRange(1, 100), help="JPEG/WebP quality [95 jpg, 90 webp].")
@click.option("--consistency", type=click.Choice(CONSISTENCY_MODES),
              help="Consistent characters for every movie (anchor_attention: frames attend to their characters' "
                   "anchor renders; torch backend). Default: as each plan says.")
@click.option("--force", is_flag=True, help="Re-render frames even if they are already done.")
@click.option("--no-style-training", is_flag=True, help="Do not immobilize styles that have no embedding; use the "
              "style name and description as text instead.")
@click.option("--cluster", type=click.Choice(["ray"]), help="Spread the work over a Ray cluster.")
@click.option("--address", default="auto", show_default=True, help="Ray address: auto | ray://host:10001 | local")
@click.option("--workers", type=int, help="Ray workers (default: one per GPU, or per CPU core group).")
@click.option("--gpus-per-worker", type=float, default=1.0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar; only errors and the summary line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
def render_cmd(plans, model, out, backend, device, dtype, batch_size, attention, cuda_graphs, compile_unet, steps,
               width, height, guidance, scheduler, seed, negative_prompt, image_format, quality, consistency, force,
               no_style_training, cluster, address, workers, gpus_per_worker, quiet, as_json):
    # Here, not at the top: torch and diffusers take seconds to import, and `--help`, `plan` or `qa` need neither.
    from engine.cluster import ClusterOptions, render_on_ray
    from engine.config import EngineConfig
    from engine.driver import render

    try:
        overrides = RenderSettings(steps=steps, width=width, height=height, guidance=guidance, scheduler=scheduler,
                                   seed=seed, negative_prompt=negative_prompt)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--{err['loc'][0]}: {err['msg'].removeprefix('Value error, ')}") from None
    config = EngineConfig(model=model, out=out, backend=backend, device=device, dtype=dtype,
                          batch_size=_batch_size(batch_size), attention=attention, cuda_graphs=cuda_graphs,
                          compile_unet=compile_unet, overrides=overrides, skip_existing=not force,
                          style_training=not no_style_training, image_format=image_format, image_quality=quality,
                          consistency=consistency, quiet=quiet or as_json)
    if cluster == "ray":
        opts = ClusterOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker)
        summary = _with_progress(config, lambda cb: render_on_ray(config, list(plans), opts, progress=cb))
    else:
        summary = _with_progress(config, lambda cb: render(config, list(plans), progress=cb))
    d = summary.as_dict()
    failures = d.get("failures", [])
    if as_json:
        click.echo(json.dumps(d))
    else:
        click.echo(f"{d['rendered']} frame(s) rendered, {d['skipped']} already done, {d['movies']} movie(s) in "
                   f"{d['seconds']:.1f} s: {d['images_per_second']:.2f} images/s, {d['unet_steps_per_second']:.1f} "
                   f"UNet steps/s (batch {d['batch_size']})")
        for worker in d.get("workers", []):
            click.echo(f"  worker {worker['worker']} ({worker['node']}): {worker['frames']} frame(s), "
                       f"{worker['images_per_second']:.2f} images/s")
        for sb in d["storyboards"]:
            click.echo(f"storyboard: {sb}")
        for f in failures:
            click.echo(f"failed: movie {f['movie']}: {f['reason']} ({f['frames_missing']} frame(s) missing)",
                       err=True)
    if failures:
        sys.exit(1)  # other movies are complete; rerunning retries only what is missing


@cli.command("eval", help="CLIP scores of rendered movies: frame vs prompt (clip_t), frames that share a character "
                          "(clip_i_shared, MovieLLM's consistency measure) and frames vs their characters' anchors "
                          "(clip_i_anchor). Writes OUT/eval.json. Give the folders of renders with and without "
                          "--consistency to compare them.")
@click.argument("outs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--clip", "clip_path", required=True, type=click.Path(path_type=Path),
              help="A local CLIP model folder in transformers' format (nothing is downloaded).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(outs, clip_path, device, as_json):
    from engine.evaluate import evaluate  # torch/transformers: seconds to import

    reports = evaluate(list(outs), clip_path, device)
    if as_json:
        click.echo(json.dumps(reports))
        return
    for r in reports:
        click.echo(f"{r['out']}: {len(r['movies'])} movie(s); overall {r['overall']}")
        for m in r["movies"]:
            click.echo(f"  {m['movie']} ({m['consistency']}): clip_t {m['clip_t']}, clip_i_shared "
                       f"{m['clip_i_shared']} ({m['shared_pairs']} pairs), clip_i_anchor {m['clip_i_anchor']} "
                       f"({m['anchor_pairs']} pairs)")


def _with_progress(config, run):
    if config.quiet:
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=False) as bar:
        task = bar.add_task("frames", total=None)

        def cb(done: int, total: int) -> None:
            bar.update(task, total=total, advance=done)

        return run(cb)


def _register_commands() -> None:
    from movielm_cli.llm_cmds import dataset_cmd, plan_cmd, qa_cmd
    from movielm_cli.bench_cmds import bench_cmd
    from movielm_cli.export_cmds import export_cmd
    from movielm_cli.style_cmds import style_group

    for cmd in (plan_cmd, qa_cmd, dataset_cmd, style_group, export_cmd, bench_cmd):
        cli.add_command(cmd)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    cli()
