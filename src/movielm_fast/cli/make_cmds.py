"""`make`: parse the plan, LLM, QA, dataset and render flags -> one MakeJob -> data.make, with a live display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from movielm_fast.data.dataset import DatasetOptions
from movielm_fast.data.demo_planner import LABEL

from .options import (
    dataset_options,
    llm_client,
    llm_options,
    plan_request_options,
    plan_requests,
    qa_options,
    render_configs,
    render_options,
)


@click.command("make")
@click.argument("themes", nargs=-1)
@plan_request_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data"), show_default=True,
              help="job folder: plans/, movies/, dataset/, index.html, make.json")
@qa_options
@dataset_options
@render_options()
@click.option("--llm", type=click.Choice(["endpoint", "demo"]), default="endpoint", show_default=True,
              help="Who writes the plans and QA: endpoint (the OpenAI-compatible LLM that --base-url, --api-key and "
                   "--llm-model name), or demo (the demo model's built-in planner, offline and without an LLM: "
                   "plans in the words the demo model can draw, QA from the plans; for trying make with --model "
                   "demo).")
@llm_options(own_model_flag=False)
def make_cmd(themes, out, qa_source, plot_questions, derived_limit, fmt, video, seconds_per_frame, fps, llm,
             max_tries, **kw):
    """Themes in, a finished dataset out: plans (LLM), style immobilization, keyframes, QA (LLM + derived) and the
    dataset export, streaming and resumable (rerun the same command after an interruption). --model is the image
    model, --llm-model the LLM's; --llm demo runs it all offline on the demo model."""
    requests = plan_requests(themes, kw)
    model, run, cluster, as_json = render_configs(out / "movies", kw)
    if llm == "demo" and model.model != "demo":
        click.echo(f"warning: --llm demo writes plans in the demo model's words; {model.model} will draw little of "
                   "them (use --model demo)", err=True)
    client = None if llm == "demo" else llm_client(kw)
    # Here, not at the top: torch and diffusers take seconds to import, and `--help` needs neither.
    from movielm_fast.data.make import MakeJob, demo_writers, llm_writers, make
    from movielm_fast.run.executors import open_executor

    job = MakeJob(out, requests, max_tries, qa_source, plot_questions, derived_limit,
                  DatasetOptions(fmt, video, seconds_per_frame, fps))
    writers = llm_writers(client) if client else demo_writers()

    # User errors (no themes, no endpoint, a bad model) end here with exit code 2, before any LLM request.
    with open_executor(model, cluster) as executor:
        if run.quiet:
            report = make(job, run, writers, executor,
                          on_failure=lambda f: click.echo(f"FAILED {_where(f)}: {f['reason']}", err=True))
        else:
            report = _live(job, run, writers, executor)
    d = report.as_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        _summary(d)
    sys.exit(report.exit_code)  # failed items are retried by rerunning; finished ones are kept


def _where(f: dict) -> str:
    what = f.get("movie") or (f"theme {f['theme']!r}" if f.get("theme") else "")
    version = f" (version {f['version']})" if f.get("version") and not f.get("movie") else ""
    return f"{f['stage']} {what}{version}".rstrip()


def _live(job, run, writers, executor):
    """One live table, a line per stage, redrawn from the job's counters four times a second."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from movielm_fast.data.make import MakeProgress, make

    progress = MakeProgress()
    console = Console(stderr=True)

    def table() -> Table:
        t = Table(title=f"make {job.out}", title_justify="left")
        for col in ("stage", "done", "in flight", "failed", "rate"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for name, s in progress.snapshot().items():
            if name == "render":
                rate = f"{s.frames / s.busy_seconds:.2f} img/s" if s.busy_seconds else ""
                done = f"{s.done} movies, {s.frames}/{s.frames_total} frames"
            else:
                elapsed = time.perf_counter() - s.first_start if s.first_start else 0.0
                rate = f"{s.done / elapsed:.2f}/s" if elapsed and s.done else ""
                done = f"{s.done}" + (f" ({s.kept} kept)" if s.kept else "")
            t.add_row(name, done, str(s.in_flight), str(s.failed), rate)
        return t

    with Live(get_renderable=table, console=console, refresh_per_second=4, transient=False):
        return make(job, run, writers, executor, progress,
                    on_failure=lambda f: console.print(f"FAILED {_where(f)}: {f['reason']}", style="red",
                                                       markup=False, highlight=False))


def _summary(d: dict) -> None:
    st = d["stages"]
    r = st.get("render", {})
    llm = d["llm"]
    writer = f"plans and QA by {LABEL}" if llm["model"] == LABEL else \
        f"LLM: {llm['requests']} request(s), {llm['cached']} from cache, " \
        f"{llm['prompt_tokens'] + llm['completion_tokens']:,} tokens"
    click.echo(f"{d['movies']['finished']} of {d['movies']['requested']} movie(s) finished in {d['seconds']:.1f} s; "
               f"{r.get('frames_rendered', 0)} frame(s) rendered ({r.get('images_per_second', 0):.2f} images/s); "
               f"{writer}")
    if d["dataset"]:
        click.echo(f"dataset: {d['dataset']['path']} ({d['dataset']['records']} record(s))")
    click.echo(f"gallery: {Path(d['out']) / 'index.html'}; report: {Path(d['out']) / 'make.json'}")
    for f in d["failures"]:
        click.echo(f"failed: {_where(f)}: {f['reason']}", err=True)
