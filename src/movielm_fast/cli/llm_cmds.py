"""`plan`, `qa` and `dataset` commands: parse flags, build one config, call data.llm / data.dataset."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from movielm_fast.data.dataset import DatasetOptions, export_dataset
from movielm_fast.data.llm import planner, qa
from movielm_fast.data.llm.client import LLMClient
from movielm_fast.errors import UserError
from movielm_fast.plan import load_plan, plan_files

from .options import dataset_options, llm_client, llm_options, plan_request_options, plan_requests, qa_options


def _say(message: str) -> None:
    click.echo(message, err=True)


def _say_usage(client: LLMClient) -> None:
    _say(client.usage.summary())
    for note in client.usage.notes:
        _say(f"note: {note}")


@click.command("plan")
@click.argument("themes", nargs=-1)
@plan_request_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("plans"), show_default=True,
              help="folder for the plan files (<theme>-<k>.json)")
@click.option("--json", "as_json", is_flag=True, help="also print the summary as one JSON line on stdout")
@llm_options(own_model_flag=True)
def plan_cmd(themes, out, as_json, max_tries, **kw):
    """Write movie plans for THEMES with an LLM; existing plan files are kept (rerun to resume)."""
    start = time.perf_counter()
    requests = plan_requests(themes, kw)
    client = llm_client(kw)

    def progress(outcome):
        mark = "kept" if outcome.skipped else ("FAILED" if outcome.error else "wrote")
        _say(f"{mark} {outcome.path or outcome.request.stem}" + (f": {outcome.error}" if outcome.error else ""))
        for warning in outcome.warnings:
            _say(f"  warning: {warning}")

    report = planner.generate_plans(client, requests, out, max_tries, progress)
    _say_usage(client)
    kept = len(report.outcomes) - len(report.written) - len(report.failures)
    warned = [o for o in report.outcomes if o.warnings]
    _say(f"{len(report.written)} plan(s) written, {kept} already present, {len(report.failures)} failed, in {out}"
         + (f"; {len(warned)} with counts other than asked (see warnings)" if warned else ""))
    if as_json:
        click.echo(json.dumps({
            "written": len(report.written), "kept": kept, "failed": len(report.failures),
            "seconds": round(time.perf_counter() - start, 2), **client.usage.as_dict(),
            "plans": [{"theme": o.request.theme, "version": o.request.version,
                       "path": str(o.path) if o.path else None, "skipped": o.skipped, "error": o.error,
                       "warnings": o.warnings} for o in report.outcomes]}))
    if report.failures:
        raise UserError(f"{len(report.failures)} of {len(report.outcomes)} plan(s) failed; the others were written",
                        "rerun the same command to retry only the failed ones")


@click.command("qa")
@click.argument("plans", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("qa.json"), show_default=True,
              help="the QA file: one record per movie")
@qa_options
@llm_options(own_model_flag=True)
def qa_cmd(plans, out, qa_source, plot_questions, derived_limit, max_tries, **kw):
    """Write MovieLLM question-answer pairs for the movies in PLANS (plan files or folders of them) to one JSON
    file."""
    files = plan_files(plans)
    movies = [loaded.movie for path in files for loaded in load_plan(path)]
    client = llm_client(kw) if qa_source != "derived" else None
    job = qa.QAJob(qa_source, plot_questions, derived_limit, max_tries, out.with_name(out.stem + ".failed"))
    records, failures = qa.generate_qa(movies, job, client)
    qa.write_qa(out, records)
    if client:
        _say_usage(client)
    _say(f"QA for {len(records)} movie(s) written to {out}")
    for movie_id, error in failures:
        _say(f"FAILED {movie_id}: {error}")
    if failures:
        raise UserError(f"QA failed for {len(failures)} of {len(movies)} movie(s); the others were written",
                        "rerun the same command; cached answers cost nothing")


@click.command("dataset")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@dataset_options
@click.option("--qa", "qa_path", type=click.Path(dir_okay=False, path_type=Path),
              help="qa.json from `movielm-fast qa`; without it QA is derived from each manifest's plan")
@click.option("--dest", type=click.Path(dir_okay=False, path_type=Path),
              help="dataset file [default OUT/dataset.json or OUT/dataset.jsonl]")
def dataset_cmd(out_dir, fmt, qa_path, video, seconds_per_frame, fps, dest):
    """Assemble rendered movies in OUT_DIR and their QA into an instruction-tuning dataset."""
    options = DatasetOptions(fmt, video, seconds_per_frame, fps, qa_path, dest)
    report = export_dataset(out_dir, options)
    for movie_id in report.derived_for:
        _say(f"no QA for {movie_id} in {qa_path}: derived from its plan")
    videos = f", {report.videos} video(s)" if video else ""
    _say(f"{report.records} record(s) from {report.movies} movie(s){videos} written to {report.path}")
    for movie_id, why in report.skipped.items():
        _say(f"skipped movie {movie_id}: {why}")
    if report.skipped:
        sys.exit(1)  # the others are exported; fixing these and running again adds them
