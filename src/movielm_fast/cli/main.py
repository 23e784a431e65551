"""`movielm-fast`: parse flags -> one config object -> call engine/export. No logic worth testing on its own."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

import click

from .clean_errors import CleanErrors
from .options import render_configs, render_options

DEMO_NOTE = ("The default model 'demo' is a small Stable-Diffusion-architecture model trained on this project's toy "
             "world: 64x64 scenes of coloured circles, squares and triangles on five backgrounds in five styles "
             "(docs/demo-model.md says what it can draw). It runs offline in seconds; pass --model PATH (a local "
             "diffusers folder) for real images.")


VERSION_MESSAGE = "%(prog)s %(version)s"

LAZY_COMMANDS = {"plan": ("llm_cmds", "plan_cmd"), "qa": ("llm_cmds", "qa_cmd"), "dataset": ("llm_cmds", "dataset_cmd"),
                 "make": ("make_cmds", "make_cmd"), "style": ("style_cmds", "style_group"),
                 "export": ("export_cmds", "export_cmd"), "bench": ("bench_cmds", "bench_cmd"),
                 "serve": ("serve_cmds", "serve_cmd")}
"""Commands whose modules load only when the command is used (or listed): `render` does not import the LLM, dataset,
export or bench wings on its way to the first frame."""


class LazyGroup(CleanErrors):
    def make_context(self, *args, **kwargs):
        # The one place that runs before any command imports torch (and off the render's call stack): OpenMP reads
        # its wait policy when torch loads it. Idle OpenMP threads spin by default, and on a busy machine a parallel
        # region then waits for threads whose cores are taken (bench/RESULTS.md, "CPU threads under load"); a policy
        # the user set is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return super().make_context(*args, **kwargs)

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(f"{__package__}.{module}"), attr), name)
        command = super().get_command(ctx, name)
        if command is not None:
            _take_verbose(command)
        return command


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-v before or after a command's name: recorded on the way down (ctx.meta is shared by a command's contexts),
    applied once the command that runs has read its own flags."""
    ctx.meta["verbose"] = ctx.meta.get("verbose", False) or value
    if not isinstance(ctx.command, click.Group):
        configure_logging(ctx.meta["verbose"])


VERBOSE = {"is_flag": True, "expose_value": False, "is_eager": True, "callback": _verbosity,
           "help": "Log details (cache hits, batch sizes); before or after the command's name."}


def _take_verbose(command: click.Command) -> None:
    """Give a command (and a group's commands) the -v flag, so it works wherever it is typed."""
    if not any(p.name == "verbose" for p in command.params):
        command.params.append(click.Option(["-v", "--verbose"], **VERBOSE))
    for sub in getattr(command, "commands", {}).values():
        _take_verbose(sub)


@click.group(cls=LazyGroup, help="movielm-fast: movie plans -> consistent keyframes -> long-video training data.")
@click.option("-v", "--verbose", **VERBOSE)
@click.version_option(package_name="movielm-fast", prog_name="movielm-fast", message=VERSION_MESSAGE)
def cli() -> None:
    pass


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advisory warnings that drown our own progress and summary."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "diffusers"):
        if name in sys.modules:  # already imported (tests): set it on the live loggers too
            lib_logging = __import__(f"{name}.utils.logging", fromlist=["x"])
            lib_logging.set_verbosity_error()
            lib_logging.disable_progress_bar()


@cli.command("render",
             help="Render every frame of the plan(s): PLAN is a plan.json or a folder of them.\n\n" + DEMO_NOTE)
@click.argument("plans", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default=Path("out"), type=click.Path(path_type=Path), show_default=True,
              help="Output folder: OUT/<movie id>/frames/, manifest.json, storyboard.png.")
@click.option("--server", help="Send the plans to a running `movielm-fast serve` at this URL and follow them; --out "
                               "is then relative to the server's output root. Render settings (--steps, --seed, "
                               "--image-format, --replace, ...) go with each plan; flags of the resident model "
                               "(--model, --device, --lora, ...) are refused: they are the server's.")
@click.option("--token", envvar="MOVIELM_SERVE_TOKEN", help="The server's token (env MOVIELM_SERVE_TOKEN).")
@render_options()
def render_cmd(plans, out, server, token, **kw):
    if server:
        from .options import server_options

        ctx = click.get_current_context()
        given = {p.name: p.opts[0] for p in ctx.command.params if p.name in kw and ctx.get_parameter_source(
            p.name) not in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)}
        as_json, quiet = kw.pop("as_json"), kw["quiet"]
        return _render_on_server(server, token, plans, out, as_json, quiet, server_options(kw, given))
    from movielm_fast.run.startup import StartupClock

    clock = StartupClock.since_process_start()  # the summary's time to first image counts from the process start
    model, run, cluster, as_json = render_configs(out, kw)  # a bad flag fails here, before seconds of imports
    # Here, not at the top: torch and diffusers take seconds to import, and `--help`, `plan` or `qa` need neither.
    from movielm_fast.engine.families import family_of_spec
    from movielm_fast.run.driver import Job, render_job, report_stage
    from movielm_fast.run.executors import open_executor

    from .progress import progress_display

    with progress_display(run.quiet) as progress:
        report_stage(progress, "validate")
        # Every plan checked before the model loads (its LoRAs against the model's family, from model_index.json).
        job = Job.load(run, list(plans), clock, family=family_of_spec(model.model))
        report_stage(progress, "load")
        with open_executor(model, cluster, on_step=getattr(progress, "step", None)) as executor:
            summary = render_job(job, executor, progress)
    d = summary.as_dict()
    failures = d.get("failures", [])
    if as_json:
        click.echo(json.dumps(d))
    else:
        click.echo(f"{d['rendered']} frame(s) rendered, {d['skipped']} already done, {d['movies']} movie(s) in "
                   f"{d['seconds']:.1f} s: {d['images_per_second']:.2f} images/s, {d['unet_steps_per_second']:.1f} "
                   f"denoiser steps/s (batch {d['batch_size']})")  # a UNet's or a transformer's
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
                          "(clip_i_anchor); per character, its frames vs its anchor and vs its most typical frame, "
                          "beside their clip_t (with --dino, DINO's similarities too). Writes OUT/eval.json. Give the "
                          "folders of renders with and without --consistency to compare them.")
@click.argument("outs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--clip", "clip_path", required=True, type=click.Path(path_type=Path),
              help="A local CLIP model folder in transformers' format (nothing is downloaded).")
@click.option("--dino", "dino_path", type=click.Path(path_type=Path), default=None,
              help="A local DINO-style model folder (DINOv2, ViT; transformers' format): per-character similarities "
                   "from its embeddings too.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(outs, clip_path, dino_path, device, as_json):
    from movielm_fast.data.evaluate import evaluate  # torch/transformers: seconds to import

    reports = evaluate(list(outs), clip_path, device, dino_path)
    if as_json:
        click.echo(json.dumps(reports))
        return
    for r in reports:
        click.echo(f"{r['out']}: {len(r['movies'])} movie(s); overall {r['overall']}")
        for m in r["movies"]:
            click.echo(f"  {m['movie']} ({m['consistency']}): clip_t {m['clip_t']}, clip_i_shared "
                       f"{m['clip_i_shared']} ({m['shared_pairs']} pairs), clip_i_anchor {m['clip_i_anchor']} "
                       f"({m['anchor_pairs']} pairs)")
            for name, c in m["characters"].items():
                click.echo(f"    {name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))


def _render_on_server(server, token, plans, out, as_json, quiet, options):
    from movielm_fast.plan import plan_files
    from movielm_fast.serve.client import follow, submit

    from .progress import progress_display

    failed = False
    for plan in plan_files(plans):
        rec = submit(server, plan, token, None if out == Path("out") else str(out), options)
        if not (quiet or as_json):
            click.echo(f"submitted {plan} as {rec['id']}", err=True)
        with progress_display(quiet or as_json) as progress:  # the server's frames as they are written
            if progress:
                progress.stage("render")
            rec = follow(server, rec["id"], token, progress)
        failed |= rec["state"] != "done"
        if as_json:
            click.echo(json.dumps(rec))
        elif rec["state"] == "cancelled":
            click.echo(f"{rec['id']}: cancelled on the server ({rec['done']} of {rec['total']} frame(s) done)",
                       err=True)
        elif rec["error"]:
            click.echo(f"failed: {rec['error']['error']} ({rec['error']['hint']})", err=True)
        else:
            d = rec["summary"]
            click.echo(f"{rec['id']}: {d['rendered']} frame(s) rendered, {d['skipped']} already done in "
                       f"{d['seconds']:.1f} s; first image after {d['startup']['time_to_first_image']} s")
    if failed:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    cli()
