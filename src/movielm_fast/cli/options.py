"""Click option groups shared by several commands, and the one place each group becomes its config object.

`render` and `make` take the render flags; `plan`, `qa` and `make` take the LLM flags; `plan` and `make` the plan
request flags; `qa` and `make` the QA flags; `dataset` and `make` the dataset flags. Each flag is declared once
here, so a name, default or help text cannot drift between commands.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click
from pydantic import ValidationError

from movielm_fast.errors import UserError
from movielm_fast.plan import CONSISTENCY_MODES, SCHEDULERS, TIMESTEP_SPACINGS, RenderSettings
from movielm_fast.run.images import IMAGE_FORMATS

if TYPE_CHECKING:
    from movielm_fast.data.llm.client import LLMClient


def _group(options: list[Callable]) -> Callable:
    """One decorator applying `options` in the order listed (so --help lists them in that order)."""
    return lambda func: functools.reduce(lambda f, opt: opt(f), reversed(options), func)


# --- rendering ---------------------------------------------------------------------------------------------------

render_options = _group([
    click.option("--model", default="demo", show_default=True,
                 help="Image model: 'demo', a diffusers folder or a .safetensors file."),
    click.option("--backend", default="torch", show_default=True,
                 help="torch | onnxruntime | tensorrt | null (measures the engine's own work; no real images)"),
    click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N"),
    click.option("--dtype", default="auto", show_default=True, help="auto | fp32 | fp16 | bf16"),
    click.option("--batch-size", default="auto", show_default=True, help="Frames per batch, or 'auto'."),
    click.option("--attention", default="sdpa", show_default=True, help="sdpa | xformers"),
    click.option("--sdpa-backend", default="auto", show_default=True,
                 help="SDPA kernel of the UNet: auto | flash | cudnn | efficient | math (all exact)."),
    click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                 help="Replay the UNet step as a CUDA graph per (batch, size) bucket [default: on with --device "
                      "cuda wherever valid]."),
    click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=None,
                 help="cuDNN's per-shape convolution algorithm search on CUDA [default: as measured, else off]."),
    click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNet step (slow first call)."),
    click.option("--steps", type=int),
    click.option("--width", type=int),
    click.option("--height", type=int),
    click.option("--guidance", type=float),
    click.option("--scheduler", type=click.Choice(SCHEDULERS)),
    click.option("--timestep-spacing", type=click.Choice(TIMESTEP_SPACINGS),
                 help="Spread of the steps over the training timesteps (few-step LoRAs: trailing). Default: the "
                      "model's scheduler config."),
    click.option("--refiner", type=click.Path(path_type=Path),
                 help="SDXL refiner folder: it denoises the end of the schedule (base + refiner, as MovieLLM)."),
    click.option("--refiner-switch", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
                 help="Fraction of the schedule the base model denoises before the refiner [0.8]."),
    click.option("--vae", type=click.Path(path_type=Path),
                 help="Decode with this VAE folder (AutoencoderKL, e.g. the fp16-fix SDXL VAE, or AutoencoderTiny "
                      "for fast drafts) instead of the model's own."),
    click.option("--seed", type=int, help="Image seed of every movie (default: each plan's own)."),
    click.option("--negative-prompt"),
    click.option("--image-format", type=click.Choice(sorted(IMAGE_FORMATS)), default="png", show_default=True,
                 help="Frame files: png (lossless) | jpg | webp (lossy, ~10x smaller, ~15x faster to encode)."),
    click.option("--quality", type=click.IntRange(1, 100), help="JPEG/WebP quality [95 jpg, 90 webp]."),
    click.option("--consistency", type=click.Choice(CONSISTENCY_MODES),
                 help="Consistent characters for every movie (anchor_attention: frames attend to their characters' "
                      "anchor renders; torch backend). Default: as each plan says."),
    click.option("--quantize", type=click.Choice(["fp8", "fp8-emulated"]),
                 help="LOSSY: the UNet's attention-block matmuls in FP8 e4m3 (GPUs of compute capability 8.9+: "
                      "Ada, Hopper). fp8-emulated: the same rounding in fp32 on any device, to measure quality."),
    click.option("--step-cache", type=click.IntRange(1), metavar="N",
                 help="LOSSY: run the whole UNet every N-th step and only its shallow layers in between, reusing "
                      "the deep features (DeepCache; ~2.5x fewer UNet FLOPs at N=3; for 20+ steps). Default: off."),
    click.option("--step-cache-depth", type=click.IntRange(0), default=0, show_default=True,
                 help="Skip branch cached by --step-cache: 0 is the fastest and most lossy; higher recomputes more."),
    click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                 help="Merge a LoRA (.safetensors; kohya/A1111 or diffusers/PEFT) into every movie at SCALE "
                      "[1.0]; repeatable. Plans add their own in style.loras / loras."),
    click.option("--force", is_flag=True, help="Re-render frames even if they are already done."),
    click.option("--replace", is_flag=True, help="Render over a movie of the same id from another plan in OUT "
                                                 "(refused without it)."),
    click.option("--no-style-training", is_flag=True, help="Do not immobilize styles that have no embedding; use "
                 "the style name and description as text instead."),
    click.option("--cluster", type=click.Choice(["ray"]), help="Spread the work over a Ray cluster."),
    click.option("--address", default="auto", show_default=True, help="Ray address: auto | ray://host:10001 | local"),
    click.option("--workers", type=int, help="Ray workers (default: one per GPU, or per CPU core group)."),
    click.option("--gpus-per-worker", type=float, default=1.0, show_default=True),
    click.option("--quiet", is_flag=True, help="No progress display; only errors and the summary."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts)."),
])

RENDER_KEYS = ("model", "backend", "device", "dtype", "batch_size", "attention", "sdpa_backend", "cuda_graphs",
               "cudnn_benchmark", "compile_unet",
               "steps", "width", "height", "guidance", "scheduler", "timestep_spacing", "refiner", "refiner_switch",
               "vae", "seed", "negative_prompt", "image_format", "quality", "consistency", "quantize", "step_cache",
               "step_cache_depth", "loras", "force", "replace",
               "no_style_training", "cluster", "address", "workers",
               "gpus_per_worker", "quiet", "as_json")


# `render --server`: what each render flag becomes for a served plan (serve.options). None of them is ignored:
# settings travel with the plan, the display flags stay here, and the rest are refused with what to do instead.
SERVED_SETTINGS = ("steps", "width", "height", "guidance", "scheduler", "timestep_spacing", "refiner",
                   "refiner_switch", "vae", "seed", "negative_prompt")
SERVED_OPTIONS = {"image_format": "image_format", "quality": "quality", "replace": "replace",
                  "no_style_training": "style_training"}
CLIENT_SIDE = ("quiet", "as_json")
_RESIDENT = ("is the server's: its model is loaded once, with the settings it was started with",
             "start the server with `movielm-fast serve {flag} ...`, or drop {flag} here")
REFUSED_ON_SERVER = {
    **{k: _RESIDENT for k in ("model", "backend", "device", "dtype", "batch_size", "attention", "sdpa_backend",
                              "cuda_graphs", "cudnn_benchmark", "compile_unet", "quantize", "step_cache",
                              "step_cache_depth")},
    "loras": ("applies to a server's every plan", "name the LoRA in the plan (loras or style.loras), or start the "
                                                  "server with --lora"),
    "consistency": ("applies to a server's every plan", "set consistency in the plan, or start the server with "
                                                        "--consistency"),
    "force": ("cannot be sent to a server: a served plan resumed after a restart must skip what it already "
              "rendered", "delete the frames to render again from the server's output, or render without --server"),
    **{k: ("is for a local run: the server renders in its own process", "drop {flag}, or render without --server")
       for k in ("cluster", "address", "workers", "gpus_per_worker")},
}


def server_options(kw: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
    """The render flags (removed from `kw`) of `render --server` -> the submission's options (serve.options).
    `given`: the flags set on the command line, name -> the flag as typed (--lora); a flag a server cannot take
    per plan is a UserError naming it."""
    f = {k: kw.pop(k) for k in RENDER_KEYS}
    for name, flag in given.items():
        if name in REFUSED_ON_SERVER:
            why, hint = REFUSED_ON_SERVER[name]
            raise UserError(f"{flag} {why.format(flag=flag)}", hint.format(flag=flag))
    render = {k: f[k] for k in SERVED_SETTINGS if k in given}
    for k in ("refiner", "vae"):  # relative to the working directory, as for `render`
        if k in render:
            render[k] = str(Path(render[k]).resolve())
    options: dict[str, Any] = {"render": render} if render else {}
    for name, key in SERVED_OPTIONS.items():
        if name in given:
            options[key] = not f[name] if name == "no_style_training" else f[name]
    return options


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter("must be a positive integer or 'auto'", param_hint="--batch-size")
    return int(value)


def parse_lora(value: str) -> tuple[str, float]:
    """FILE[:SCALE] -> (FILE, SCALE). Only a number after the last ':' is a scale, so C:\\x.safetensors or a
    path with colons in it stays whole."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, 1.0


def engine_config(out: Path, kw: dict[str, Any]):
    """The render flags (removed from `kw`) -> (EngineConfig, ClusterOptions or None for a local run, --json)."""
    # Here, not at the top: torch and diffusers take seconds to import, and `--help`, `plan` or `qa` need neither.
    from movielm_fast.engine.config import EngineConfig
    from movielm_fast.engine.models import check_refiner, vae_folder
    from movielm_fast.run.cluster import ClusterOptions

    f = {k: kw.pop(k) for k in RENDER_KEYS}
    # Folders from flags are relative to the working directory (a plan's own are relative to the plan file).
    folders = {k: str(f[k].resolve()) for k in ("refiner", "vae") if f[k] is not None}
    if "refiner" in folders:
        check_refiner(folders["refiner"])
    if "vae" in folders:
        vae_folder(folders["vae"])
    try:
        overrides = RenderSettings(steps=f["steps"], width=f["width"], height=f["height"], guidance=f["guidance"],
                                   scheduler=f["scheduler"], seed=f["seed"], negative_prompt=f["negative_prompt"],
                                   timestep_spacing=f["timestep_spacing"], refiner_switch=f["refiner_switch"],
                                   **folders)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--{err['loc'][0]}: {err['msg'].removeprefix('Value error, ')}") from None
    config = EngineConfig(model=f["model"], out=out, backend=f["backend"], device=f["device"], dtype=f["dtype"],
                          batch_size=_batch_size(f["batch_size"]), attention=f["attention"],
                          sdpa_backend=f["sdpa_backend"], cuda_graphs=f["cuda_graphs"],
                          cudnn_benchmark=f["cudnn_benchmark"], compile_unet=f["compile_unet"], overrides=overrides,
                          skip_existing=not f["force"], replace=f["replace"], style_training=not f["no_style_training"],
                          image_format=f["image_format"], image_quality=f["quality"], consistency=f["consistency"],
                          quantize=f["quantize"], step_cache=f["step_cache"], step_cache_depth=f["step_cache_depth"],
                          loras=tuple(parse_lora(v) for v in f["loras"]), quiet=f["quiet"] or f["as_json"])
    cluster = None
    if f["cluster"] == "ray":
        cluster = ClusterOptions(address=f["address"], workers=f["workers"], gpus_per_worker=f["gpus_per_worker"])
    return config, cluster, f["as_json"]


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
                     help="seconds per request before it is retried (in a structured-output mode: before the "
                     "next mode is tried)"),
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
