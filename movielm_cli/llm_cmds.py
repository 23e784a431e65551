"""`plan`, `qa` and `dataset` commands: parse flags, build one config, call engine.llm / engine.dataset."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import click

from engine.dataset import DatasetOptions, export_dataset
from engine.errors import UserError
from engine.llm import planner, qa
from engine.llm.client import LLMClient, default_cache_dir, resolve_config
from engine.plan import load_plan


def llm_options(func):
    """Endpoint, sampling and batching flags shared by every command that talks to the LLM."""
    options = [
        click.option("--base-url", envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint, e.g. "
                     "http://localhost:8000/v1 [env OPENAI_BASE_URL; default: OpenAI]"),
        click.option("--api-key", envvar="OPENAI_API_KEY", help="API key [env OPENAI_API_KEY]; local servers "
                     "need none"),
        click.option("--model", envvar="OPENAI_MODEL", help="model name [env OPENAI_MODEL; default gpt-4o-mini]"),
        click.option("--temperature", type=float, help="sampling temperature (server default if unset)"),
        click.option("--seed", type=int, help="sampling seed, for servers that honour it"),
        click.option("--max-tokens", type=click.IntRange(16), help="cap on tokens per reply [default: sized from "
                     "the request, e.g. 400 + 150 per frame + 80 per character for a plan]"),
        click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
                     help="requests in flight at once"),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
                     help="seconds per request before it is retried (in a structured-output mode: before the "
                     "next mode is tried)"),
        click.option("--max-retries", type=click.IntRange(0, 20), default=4, show_default=True,
                     help="retries per request on timeouts, 429 and 5xx, with the openai client's back-off"),
        click.option("--max-tries", type=click.IntRange(1, 10), default=3, show_default=True,
                     help="answers asked per item when the model's output is invalid (errors are fed back)"),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="response cache [default $MOVIELM_CACHE/llm, else ~/.cache/movielm-fast/llm]"),
        click.option("--no-cache", is_flag=True, help="neither read nor write the response cache"),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), func)


def _client(kw: dict) -> LLMClient:
    no_cache, cache_dir = kw.pop("no_cache"), kw.pop("cache_dir")
    config = resolve_config(kw.pop("base_url"), kw.pop("api_key"), kw.pop("model"),
                            temperature=kw.pop("temperature"), seed=kw.pop("seed"), max_tokens=kw.pop("max_tokens"),
                            concurrency=kw.pop("concurrency"), timeout=kw.pop("timeout"),
                            max_retries=kw.pop("max_retries"),
                            cache_dir=None if no_cache else cache_dir or default_cache_dir())
    return LLMClient(config)


def _say(message: str) -> None:
    click.echo(message, err=True)


def _say_usage(client: LLMClient) -> None:
    _say(client.usage.summary())
    for note in client.usage.notes:
        _say(f"note: {note}")


@click.command("plan")
@click.argument("themes", nargs=-1)
@click.option("--themes-file", type=click.Path(dir_okay=False, path_type=Path),
              help="more themes, one per line ('#' starts a comment)")
@click.option("--genre", help="genre for every plan, e.g. romance")
@click.option("--frames", type=click.IntRange(1, 500), default=30, show_default=True, help="keyframes per movie")
@click.option("--characters", type=click.IntRange(1, 20), default=3, show_default=True, help="main characters")
@click.option("-n", "count", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="distinct movies per theme")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("plans"), show_default=True,
              help="folder for the plan files (<theme>-<k>.json)")
@click.option("--strict-counts", is_flag=True, help="require exactly --frames and --characters (default: within "
              "25%, at least 2, is accepted with a warning)")
@click.option("--json", "as_json", is_flag=True, help="also print the summary as one JSON line on stdout")
@llm_options
def plan_cmd(themes, themes_file, genre, frames, characters, count, out, strict_counts, as_json, max_tries, **kw):
    """Write movie plans for THEMES with an LLM; existing plan files are kept (rerun to resume)."""
    start = time.perf_counter()
    all_themes = list(themes) + (planner.read_themes_file(themes_file) if themes_file else [])
    requests = planner.build_requests(all_themes, genre, frames, characters, count, strict_counts)
    client = _client(kw)

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
@click.argument("plans", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("qa.json"), show_default=True)
@click.option("--source", type=click.Choice(["llm", "derived", "both"]), default="both", show_default=True,
              help="ask the LLM, derive questions from the plan without an LLM, or both")
@click.option("--plot-questions", type=click.IntRange(1, 100), default=5, show_default=True,
              help="plot_qa pairs asked from the LLM per movie")
@click.option("--derived-limit", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="cap on each kind of derived temporal question per movie")
@llm_options
def qa_cmd(plans, out, source, plot_questions, derived_limit, max_tries, **kw):
    """Write MovieLLM question-answer pairs for the movies in PLANS to one JSON file."""
    movies = [loaded.movie for path in plans for loaded in load_plan(path)]
    client = _client(kw) if source != "derived" else None
    job = qa.QAJob(source, plot_questions, derived_limit, max_tries, out.with_name(out.stem + ".failed"))
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
@click.option("--format", "fmt", type=click.Choice(["llava", "jsonl"]), default="llava", show_default=True,
              help="llava: one JSON list; jsonl: one record per line")
@click.option("--qa", "qa_path", type=click.Path(dir_okay=False, path_type=Path),
              help="qa.json from `movielm-fast qa`; without it QA is derived from each manifest's plan")
@click.option("--video", is_flag=True, help="encode one mp4 per movie and reference it instead of the frames")
@click.option("--seconds-per-frame", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
              help="how long each keyframe is shown in the mp4")
@click.option("--fps", type=click.FloatRange(min=0.01), help="repeat keyframes to this frame rate "
              "(default: one encoded frame per keyframe)")
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
