"""Click option groups shared by several commands, and the one place each group becomes its config object.

`render`, `make` and `serve` take the render flags, made from the settings' declarations (movielm_fast.settings);
`plan`, `qa` and `make` take the LLM flags; `plan` and `make` the plan request flags; `qa` and `make` the QA flags;
`dataset` and `make` the dataset flags. Each flag is declared once, so a name, default or help text cannot drift
between commands.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Callable, Literal, Union, get_args, get_origin

import click
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from movielm_fast.engine.config import ModelConfig
from movielm_fast.errors import UserError
from movielm_fast.plan import PATH_SETTINGS, RenderSettings
from movielm_fast.run.config import ClusterOptions, RunConfig
from movielm_fast.settings import PER_PLAN, flag_of, meta, validation_error

if TYPE_CHECKING:
    from movielm_fast.data.llm.client import LLMClient


def _group(options: list[Callable]) -> Callable:
    """One decorator applying `options` in the order listed (so --help lists them in that order)."""
    return lambda func: functools.reduce(lambda f, opt: opt(f), reversed(options), func)


# --- rendering ---------------------------------------------------------------------------------------------------
# The render flags are made from the settings' own declarations (movielm_fast.settings): a flag's name, type,
# choices, default and help are those of its setting, and `serve` reads the same declarations.

RENDER_SETTINGS = (ModelConfig, RenderSettings, RunConfig, ClusterOptions)
"""Where each render flag is declared, in --help order: the model, the plan's render settings, the run, the
cluster."""


def _flag_option(name: str, field: Any) -> Callable:
    """The click option of one setting, from its type, default, help and flag spelling."""
    spelling = meta(field, "flag") or "--" + name.replace("_", "-")
    annotation = field.annotation
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]
    base = args[0] if len(args) == 1 else str  # int | Literal["auto"] (--batch-size): parsed by the setting
    default = None if field.default is PydanticUndefined else field.default
    kw: dict[str, Any] = {"help": field.description, "metavar": meta(field, "metavar")}
    if base is bool and "/" not in spelling:
        kw.update(is_flag=True, default=bool(default))
    elif base is bool:
        kw.update(default=default, show_default=default is not None)
    elif get_origin(base) is tuple:  # --lora: repeatable, each FILE[:SCALE] parsed by the setting
        kw.update(multiple=True)
    else:
        choices = get_args(base) if get_origin(base) is Literal else None
        kind = click.Choice(choices) if choices else {int: click.INT, float: click.FLOAT, Path: click.Path(
            path_type=Path)}.get(base, click.STRING)
        kw.update(type=kind, default=default, show_default=default is not None)
    return click.option(spelling, name, **kw)


def setting_flags(*models: type) -> list[tuple[type, str]]:
    """(model, field name) of every setting of `models` that has a flag, each model's own fields first."""
    out = []
    for model in models:
        own = [n for n in model.model_fields if n in model.__annotations__]
        for name in own + [n for n in model.model_fields if n not in own]:
            field = model.model_fields[name]
            if field.json_schema_extra is not None and meta(field, "flag") is not None:
                out.append((model, name))
    return out


def settings_options(model: type, *names: str) -> Callable:
    """The flags of some of `model`'s settings, for a command that takes only those (`style train`: the model's)."""
    return _group([_flag_option(name, model.model_fields[name]) for name in names])


def render_options(cluster: bool = True, json: bool = True) -> Callable:
    """Every render flag: the model's, the render settings, the run's, with `cluster` the Ray flags, and with `json`
    --json (a command that prints a summary)."""
    models = RENDER_SETTINGS if cluster else RENDER_SETTINGS[:-1]
    flags = [_flag_option(name, model.model_fields[name]) for model, name in setting_flags(*models)]
    if json:
        flags.append(click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts)."))
    return _group(flags)


def _settings(model: type, kw: dict[str, Any]) -> dict[str, Any]:
    """The values of `model`'s flags, removed from `kw` (flags a command does not offer are left out)."""
    return {name: kw.pop(name) for m, name in setting_flags(model) if name in kw}


def render_configs(out: Path, kw: dict[str, Any]) -> tuple[ModelConfig, RunConfig, ClusterOptions, bool]:
    """The render flags (removed from `kw`) -> the model's config, the run's, where its batches go, and --json
    (which makes the run quiet: the summary is the only output)."""
    as_json = kw.pop("as_json", False)
    try:
        overrides = RenderSettings(**_settings(RenderSettings, kw))
    except ValidationError as exc:
        raise validation_error(exc, RenderSettings) from None
    # Folders from flags are relative to the working directory (a plan's own are relative to the plan file).
    folders = {k: str(Path(v).resolve()) for k in PATH_SETTINGS if (v := getattr(overrides, k))}
    if folders:
        from movielm_fast.engine.models import check_refiner, vae_folder  # diffusers: only when a folder is named

        if "refiner" in folders:
            check_refiner(folders["refiner"])
        if "vae" in folders:
            vae_folder(folders["vae"])
    model = ModelConfig(**_settings(ModelConfig, kw))
    run = RunConfig(out=out, overrides=overrides.model_copy(update=folders), **{**_settings(RunConfig, kw),
                                                                                  **({"quiet": True} if as_json else {})})
    cluster = ClusterOptions(**_settings(ClusterOptions, kw))
    if cluster.cluster is None:
        given = [flag_of(ClusterOptions, k) for k in ("address", "workers", "gpus_per_worker")
                 if getattr(cluster, k) != ClusterOptions.model_fields[k].default]
        if given:
            raise UserError(f"{given[0]} is a Ray setting; this run is local", f"add --cluster ray, or drop {given[0]}")
    if not run.quiet:  # --dtype auto on a CPU with native bf16: say what it may gain (once per machine)
        from movielm_fast.engine.cpu import print_auto_dtype_hint

        print_auto_dtype_hint(model.dtype, model.torch_device)
    return model, run, cluster, as_json


def server_rule(model: type, name: str) -> str | tuple[str, str]:
    """What `render --server` does with a render flag: "render" (sent as the plan's render setting), PER_PLAN (sent
    as an option of the plan), CLIENT (used here), or the (why, hint) of its refusal."""
    if model is RenderSettings:
        return "render"
    return meta(model.model_fields[name], "served") or model.served


def server_options(kw: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
    """The render flags (removed from `kw`) of `render --server` -> the submission's options (serve.options).
    `given`: the flags set on the command line, name -> the flag as typed (--lora); a flag a server cannot take
    per plan is a UserError naming it."""
    rules = {name: (model, server_rule(model, name)) for model, name in setting_flags(*RENDER_SETTINGS)}
    values = {name: kw.pop(name) for name in rules if name in kw}
    for name, flag in given.items():
        rule = rules[name][1] if name in rules else None
        if isinstance(rule, tuple):
            why, hint = rule
            raise UserError(f"{flag} {why.format(flag=flag)}", hint.format(flag=flag))
    render = {k: values[k] for k in given if rules.get(k, (None, None))[1] == "render"}
    try:
        RenderSettings(**render)
    except ValidationError as exc:
        raise validation_error(exc, RenderSettings) from None
    for k in PATH_SETTINGS:  # relative to the working directory, as for `render`
        if k in render:
            render[k] = str(Path(render[k]).resolve())
    options: dict[str, Any] = {"render": render} if render else {}
    options.update({k: values[k] for k in given if rules.get(k, (None, None))[1] == PER_PLAN})
    return options


# --- the LLM -----------------------------------------------------------------------------------------------------


def llm_options(own_model_flag: bool) -> Callable:
    """Endpoint, sampling and batching flags of every command that talks to the LLM. The LLM's model name and
    sampling seed are --llm-model / --llm-seed everywhere; commands that render nothing (`plan`, `qa`) also take
    them as --model / --seed, as before (`make` has its image --model and --seed)."""
    model_names = ("--llm-model", "--model") if own_model_flag else ("--llm-model",)
    seed_names = ("--llm-seed", "--seed") if own_model_flag else ("--llm-seed",)
    return _group([
        click.option("--base-url", envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint, e.g. "
                     "http://localhost:8000/v1 [env OPENAI_BASE_URL; default: OpenAI]"),
        click.option("--api-key", envvar="OPENAI_API_KEY", help="API key [env OPENAI_API_KEY]; local servers "
                     "need none"),
        click.option(*model_names, "llm_model", envvar="OPENAI_MODEL",
                     help="LLM model name [env OPENAI_MODEL; default gpt-4o-mini]"),
        click.option("--temperature", type=float, help="sampling temperature (server default if unset)"),
        click.option(*seed_names, "llm_seed", type=int, help="LLM sampling seed, for servers that honour it"),
        click.option("--max-tokens", type=click.IntRange(16), help="cap on tokens per reply [default: sized from "
                     "the request, e.g. 400 + 150 per frame + 80 per character for a plan]"),
        click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
                     help="LLM requests in flight at once"),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
                     help="seconds a request may take, its whole reply included, before it is retried (in a "
                     "structured-output mode: before the next mode is tried)"),
        click.option("--max-retries", type=click.IntRange(0, 20), default=4, show_default=True,
                     help="retries per request on timeouts, 429 and 5xx, with the openai client's back-off"),
        click.option("--max-tries", type=click.IntRange(1, 10), default=3, show_default=True,
                     help="answers asked per item when the model's output is invalid (errors are fed back)"),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="response cache [default $MOVIELM_CACHE/llm, else ~/.cache/movielm-fast/llm]"),
        click.option("--no-cache", is_flag=True, help="neither read nor write the response cache"),
    ])


def llm_client(kw: dict[str, Any]) -> LLMClient:
    """The LLM flags (removed from `kw`, except --max-tries, which is the caller's) -> a client."""
    from movielm_fast.data.llm.client import LLMClient, default_cache_dir, resolve_config  # not on render's path

    no_cache, cache_dir = kw.pop("no_cache"), kw.pop("cache_dir")
    config = resolve_config(kw.pop("base_url"), kw.pop("api_key"), kw.pop("llm_model"),
                            temperature=kw.pop("temperature"), seed=kw.pop("llm_seed"),
                            max_tokens=kw.pop("max_tokens"), concurrency=kw.pop("concurrency"),
                            timeout=kw.pop("timeout"), max_retries=kw.pop("max_retries"),
                            cache_dir=None if no_cache else cache_dir or default_cache_dir())
    return LLMClient(config)


# --- plans, QA, dataset ------------------------------------------------------------------------------------------

plan_request_options = _group([
    click.option("--themes-file", type=click.Path(dir_okay=False, path_type=Path),
                 help="more themes, one per line ('#' starts a comment)"),
    click.option("--genre", help="genre for every plan, e.g. romance"),
    click.option("--frames", type=click.IntRange(1, 500), default=30, show_default=True, help="keyframes per movie"),
    click.option("--characters", type=click.IntRange(1, 20), default=3, show_default=True, help="main characters"),
    click.option("-n", "count", type=click.IntRange(1, 1000), default=1, show_default=True,
                 help="distinct movies per theme"),
    click.option("--strict-counts", is_flag=True, help="require exactly --frames and --characters (default: within "
                 "25%, at least 2, is accepted with a warning)"),
])


def plan_requests(themes: tuple[str, ...], kw: dict[str, Any]):
    """THEMES and the plan request flags (removed from `kw`) -> the plan requests (UserError when there are none)."""
    from movielm_fast.data.llm import planner

    themes_file = kw.pop("themes_file")
    all_themes = list(themes) + (planner.read_themes_file(themes_file) if themes_file else [])
    return planner.build_requests(all_themes, kw.pop("genre"), kw.pop("frames"), kw.pop("characters"),
                                  kw.pop("count"), kw.pop("strict_counts"))


qa_options = _group([
    click.option("--source", "qa_source", type=click.Choice(["llm", "derived", "both"]), default="both",
                 show_default=True, help="QA: ask the LLM, derive questions from the plan without an LLM, or both"),
    click.option("--plot-questions", type=click.IntRange(1, 100), default=5, show_default=True,
                 help="plot_qa pairs asked from the LLM per movie"),
    click.option("--derived-limit", type=click.IntRange(1, 1000), default=5, show_default=True,
                 help="cap on each kind of derived temporal question per movie"),
])

dataset_options = _group([
    click.option("--format", "fmt", type=click.Choice(["llava", "jsonl"]), default="llava", show_default=True,
                 help="dataset: llava (one JSON list) or jsonl (one record per line)"),
    click.option("--video", is_flag=True, help="encode one mp4 per movie and reference it instead of the frames"),
    click.option("--seconds-per-frame", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
                 help="how long each keyframe is shown in the mp4"),
    click.option("--fps", type=click.FloatRange(min=0.01), help="repeat keyframes to this frame rate "
                 "(default: one encoded frame per keyframe)"),
])
