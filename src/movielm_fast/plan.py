"""plan.json (version 1): typed model and complete validation.

A file holds one movie object or ``{"version": 1, "defaults": {...}, "movies": [...]}``. `load_plan` validates
the whole file before anything else happens and raises one `PlanError` listing every problem with its JSON path
and a fix. Render settings cascade: command-line overrides > movie ``render`` > file ``defaults`` > built-ins.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from movielm_fast.errors import PlanError, UserError
from movielm_fast.settings import setting

SCHEDULERS = ("dpmpp", "dpmpp_sde", "euler", "euler_a", "ddim", "unipc", "lcm", "tcd", "pndm", "default")
"""The sampling algorithms a plan may name (engine.schedulers builds each from the model's own scheduler config);
"default" is the model's own scheduler class."""
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SEED_MODES = ("per_frame", "shared")
CONSISTENCY_MODES = ("none", "character_token", "anchor_attention")

# Shot sizes a frame may name (film-crew vocabulary, as LLM keyframe planners use it). Case, '_' / '-' / spaces and
# a trailing " shot" are normalised ("Close_Up shot" -> "close-up"); anything else is a plan error listing these.
SHOTS = ("extreme wide", "wide", "medium", "close-up", "extreme close-up", "over-the-shoulder", "point of view",
         "insert")


def _shot_key(text: str) -> str:
    key = re.sub(r"[\s_-]+", " ", text.strip().lower())
    return key.removesuffix(" shot") if key != "shot" else key


_SHOT_BY_KEY = {_shot_key(s): s for s in SHOTS}


def normalise_shot(value: str | None) -> str | None:
    """The canonical shot name, None for an empty one; ValueError (listing the vocabulary) for anything else."""
    if value is None or not value.strip():
        return None
    shot = _SHOT_BY_KEY.get(_shot_key(value))
    if shot is None:
        raise ValueError(f"unknown shot {value!r}: use one of {', '.join(SHOTS)} (or leave it out)")
    return shot


class _Strict(BaseModel):
    # Attribute docstrings are the fields' descriptions in the plan's JSON schema (plan_schema).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, use_attribute_docstrings=True)


def _check_id(value: str) -> str:
    if not SAFE_ID.match(value) or value in (".", ".."):
        raise ValueError(
            f"id {value!r} is not safe as a file name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class LoraEntry(_Strict):
    """A LoRA to merge: `file` (.safetensors, relative to the plan file) at strength `scale`."""

    file: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=-100.0, le=100.0)


class Style(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    embedding: str | None = None
    """Path to a textual-inversion file (diffusers safetensors or A1111 .pt/.safetensors); relative to the plan."""
    token: str | None = None
    """Token the embedding is bound to; default: the token stored in the file, else ``<style-name>``."""
    loras: list[LoraEntry] = Field(default_factory=list)
    """LoRAs every movie of this style renders with (after --lora ones, before the movie's own)."""


class Character(_Strict):
    name: str = Field(min_length=1)
    appearance: str = Field(min_length=1)


class Frame(_Strict):
    id: str
    description: str = Field(min_length=1)
    dialogue: str = ""
    shot: str | None = None
    """Shot size, one of SHOTS; goes into the prompt before the description."""
    camera: str = ""
    """Free text: angle, lens or movement ("low angle", "35mm"); goes into the prompt after the shot."""
    speaker: str = ""
    """Name of the character who says `dialogue`; empty when nobody speaks."""
    shown: list[str] = Field(default_factory=list)
    """Characters the frame shows that its description does not name ("she", "the detective"), by name: consistency
    mode gives them their identity (the speaker counts as shown too)."""
    seed: int | None = Field(default=None, ge=0, lt=2**63)

    _id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))
    _shot = field_validator("shot")(classmethod(lambda cls, v: normalise_shot(v)))


class ConsistencySettings(BaseModel):
    """Consistent characters (character_token: style.characters; anchor_attention: engine.consistency; docs/
    consistency.md): `consistency` in a movie or in the file's `defaults`;
    `--consistency MODE` on the command line sets the mode and keeps the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    mode: Literal[CONSISTENCY_MODES] = "none"  # type: ignore[valid-type]
    anchor_prompt: str = "{appearance}"
    """The anchor's prompt after the style prefix; {appearance} is the character's appearance. Name a setting that
    shows the character whole and plainly (a toy-world character needs a place and a background)."""
    token_steps: int = Field(default=300, ge=1)
    """character_token: training steps of each character's token (300 held the DiT demo's characters better than
    150: bench/RESULTS.md)."""
    token_lr: float | None = Field(default=None, gt=0.0)
    """character_token: the token's learning rate; None: the style trainer's for the model."""
    token_min_noise: float = Field(default=0.5, ge=0.0, lt=1.0)
    """character_token: the lowest noise level the token trains at, as a share of the schedule. The noisier levels
    are where a model settles what the text leaves open (a colour, a face); trained at every level, the token spends
    itself on the anchor's fine detail instead (docs/consistency.md)."""
    anchor_steps: int | None = Field(default=None, ge=1, le=1000)
    """character_token: denoising steps of each character's anchor; None: twice the frames' steps. An anchor renders
    once per character, so it can afford them: a render with few steps more often leaves what the text leaves open
    undecided (a blend of two colours), and the token would learn the blend. anchor_attention renders its anchors at
    the frames' own steps (it records them step by step)."""
    token_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    """Share of an anchor's tokens a frame attends to, per layer (StoryDiffusion's sampling rate, 0.5)."""
    start_step: int = Field(default=1, ge=0)
    """Steps before this one use plain attention (the layout forms first) and are not recorded."""
    end_step: int | None = Field(default=None, ge=1)
    """Steps from this one on use plain attention again; None: to the end."""
    max_layer_tokens: int | None = Field(default=None, ge=1)
    """Only layers with at most this many tokens take part (e.g. 1024 leaves out SD 1.5's 64x64 layers at 512 px,
    which hold over half of the record); None: every up-block self-attention layer."""
    offload: bool = False
    """Keep records in host memory and move each to the device when used: less device memory, a copy per use."""

    @field_validator("anchor_prompt")
    @classmethod
    def _one_appearance(cls, v: str) -> str:
        if v.count("{appearance}") != 1:
            raise ValueError("must contain {appearance} exactly once, where the character's appearance goes "
                             '(e.g. "{appearance}, full body, plain background")')
        return v


class RenderSettings(_Strict):
    """Per-frame rendering settings. Every field is optional here so that layers can cascade; the fields with a
    help text are also command-line flags (--width, --steps, ...), which win over every plan."""

    width: int | None = setting(None, "Frame width in pixels (the model's default: its native size).", ge=64, le=4096)
    height: int | None = setting(None, "Frame height in pixels (the model's default: its native size).", ge=64,
                                 le=4096)
    steps: int | None = setting(None, "Denoising steps.", ge=1, le=1000)
    guidance: float | None = setting(None, "Classifier-free guidance scale (1 or less: none; guidance-distilled "
                                           "models embed it).", ge=0.0, le=50.0)
    true_cfg: float | None = setting(None, "True classifier-free guidance of FLUX.1 against the negative prompt "
                                           "(diffusers' true_cfg_scale): above 1, a second transformer pass per "
                                           "step. Default: off.", ge=0.0, le=50.0)
    scheduler: Literal[SCHEDULERS] | None = setting(  # type: ignore[valid-type]
        None, "Sampling algorithm, built from the model's own scheduler config ('default': the model's own class).")
    negative_prompt: str | None = setting(None, "Negative prompt of every frame.")
    seed: int | None = setting(None, "Image seed of every movie; each frame's is derived from it and the movie and "
                                     "frame ids.", ge=0, lt=2**63)
    seed_mode: Literal[SEED_MODES] | None = None  # type: ignore[valid-type]
    consistency: ConsistencySettings | None = None
    timestep_spacing: Literal[TIMESTEP_SPACINGS] | None = setting(  # type: ignore[valid-type]
        None, "How the steps are spread over the training timesteps (few-step models such as SDXL-Lightning and "
              "Hyper-SD: trailing). Default: as the model's scheduler config says.")
    refiner: str | None = setting(None, "SDXL refiner folder that denoises the end of the schedule (base + refiner, "
                                        "as MovieLLM); in a plan, relative to the plan file.")
    refiner_switch: float | None = setting(None, "Fraction of the schedule the base model denoises before the "
                                                 "refiner takes over (diffusers' denoising_end).", gt=0.0, lt=1.0)
    vae: str | None = setting(None, "VAE folder (AutoencoderKL, e.g. the fp16-fix SDXL VAE, or AutoencoderTiny for "
                                    "fast drafts) that decodes instead of the model's own; in a plan, relative to the "
                                    "plan file.")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            lo, hi = v - v % 8, v - v % 8 + 8
            raise ValueError(f"must be a multiple of 8 (SD VAEs downsample by 8): use {lo} or {hi}")
        return v


MODEL_SETTINGS = ("width", "height", "steps", "guidance", "true_cfg")
"""The render settings a model brings where neither a flag nor the plan sets them (engine.models.model_defaults)."""
BUILTIN_RENDER = RenderSettings(
    width=512, height=512, steps=25, guidance=7.5, scheduler="dpmpp", negative_prompt="", seed=0,
    seed_mode="per_frame", consistency=ConsistencySettings(), refiner_switch=0.8,
)
PATH_SETTINGS = ("refiner", "vae")  # folders named in a plan: relative to the plan file


def _paths_from(settings: RenderSettings, base: Path) -> RenderSettings:
    update = {k: str(base / v) for k in PATH_SETTINGS if (v := getattr(settings, k)) and not Path(v).is_absolute()}
    return settings.model_copy(update=update) if update else settings


def absolute_plan_paths(data: Any, base: Path) -> tuple[Any, list[tuple[str, Path]]]:
    """Raw plan JSON -> (a copy whose file and folder paths are absolute, relative ones joined to `base`, and every
    such (JSON path, path)). The paths a plan may name: style.embedding, style.loras[].file, loras[].file and
    render.refiner / render.vae of a movie, defaults.refiner / defaults.vae of a file. For plans that travel without
    their folder (`render --server`, serve's queue); parts of the wrong shape are left for validation to report."""
    data = copy.deepcopy(data)
    found: list[tuple[str, Path]] = []

    def fix(obj: Any, key: str, where: str) -> None:
        if isinstance(obj, dict) and isinstance(obj.get(key), str) and obj[key]:
            obj[key] = str(base / obj[key])  # an absolute path stays itself
            found.append((f"{where}.{key}", Path(obj[key])))

    def fix_loras(obj: Any, where: str) -> None:
        loras = obj.get("loras") if isinstance(obj, dict) else None
        for i, entry in enumerate(loras if isinstance(loras, list) else []):
            fix(entry, "file", f"{where}.loras[{i}]")

    def fix_movie(m: Any, where: str) -> None:
        if not isinstance(m, dict):
            return
        style = m.get("style")
        fix(style, "embedding", f"{where}.style")
        fix_loras(style, f"{where}.style")
        fix_loras(m, where)
        for key in PATH_SETTINGS:
            fix(m.get("render"), key, f"{where}.render")

    if isinstance(data, dict) and "movies" in data:
        for key in PATH_SETTINGS:
            fix(data.get("defaults"), key, "$.defaults")
        for i, m in enumerate(data["movies"] if isinstance(data["movies"], list) else []):
            fix_movie(m, f"$.movies[{i}]")
    else:
        fix_movie(data, "$")
    return data, found


def merge_settings(*layers: RenderSettings | None) -> RenderSettings:
    """First non-None value wins, layer by layer (highest priority first)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        for key, value in layer.model_dump().items():
            if merged.get(key) is None and value is not None:
                merged[key] = value
    return RenderSettings(**merged)


class Movie(_Strict):
    id: str
    title: str = ""
    theme: str = ""
    overview: str = ""
    style: Style
    characters: list[Character] = Field(default_factory=list)
    frames: list[Frame] = Field(min_length=1)
    render: RenderSettings | None = None
    consistency: ConsistencySettings | None = None
    """The movie's consistency mode; same as render.consistency (give one of them)."""
    loras: list[LoraEntry] = Field(default_factory=list)
    """The movie's own LoRAs, merged after --lora and the style's (engine.lora.combine says how they add up)."""

    _id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))


class PlanFile(_Strict):
    version: Literal[1] = 1
    defaults: RenderSettings | None = None
    movies: list[Movie] = Field(min_length=1)


class LoadedMovie(BaseModel):
    """A validated movie with its render settings resolved (without command-line overrides)."""

    movie: Movie
    settings: RenderSettings
    plan_dir: Path
    own: RenderSettings | None = None
    """What the plan itself sets (movie render > file defaults), before any built-in default: a model's own
    defaults (`resolved(model=...)`) slot in between."""
    source: str = ""
    """The plan file it came from (absolute), part of the movie's identity in its output folder."""
    file_roots: tuple[Path, ...] | None = None
    """The only folders the movie may read files from (a served plan: the server's --allow-files), checked each
    time a file is opened (`confined`); None: anywhere (a local run reads what its user names)."""

    def resolved(self, overrides: RenderSettings | None = None, model: RenderSettings | None = None
                 ) -> RenderSettings:
        """command line > plan (movie, then file defaults) > `model` (its native size, its own steps and guidance;
        engine.models.model_defaults) > built-ins."""
        if model is None or self.own is None:
            return merge_settings(overrides, self.settings)
        return merge_settings(overrides, self.own, model, self.settings)

    def lora_files(self) -> list[tuple[str, Path, float]]:
        """(JSON path, file, scale) of the style's LoRAs, then the movie's; files resolved against the plan and
        `confined` (call it right before reading them)."""
        st = [(f"style.loras[{i}]", e) for i, e in enumerate(self.movie.style.loras)]
        own = [(f"loras[{i}]", e) for i, e in enumerate(self.movie.loras)]
        return [(where, self.confined(self.plan_dir / e.file, where), e.scale) for where, e in st + own]

    def embedding_file(self) -> Path | None:
        """The style's embedding file, resolved against the plan and `confined`; None when it names none."""
        st = self.movie.style
        return self.confined(self.plan_dir / st.embedding, "style.embedding") if st.embedding else None

    def confined_folders(self, settings: RenderSettings) -> RenderSettings:
        """`settings` (this movie's, resolved) with its refiner and VAE folders `confined`."""
        update = {k: str(self.confined(Path(v), f"render.{k}")) for k in PATH_SETTINGS if (v := getattr(settings, k))}
        return settings.model_copy(update=update) if update else settings

    def confined(self, path: Path, where: str) -> Path:
        """`path` with its links resolved, when it lies (and, for a folder, everything in it lies) inside one of
        `file_roots`; else a UserError. Checked at each call, never once for all: a file swapped for a link after
        the plan was accepted is caught when it is read."""
        if self.file_roots is None:
            return path
        real = path.resolve()
        links = [p for p in real.rglob("*") if p.is_symlink()] if real.is_dir() else []  # a folder's files too
        outside = [p for p in [real, *links] if not any(p.resolve().is_relative_to(r) for r in self.file_roots)]
        if outside:
            roots = ", ".join(map(str, self.file_roots))
            raise UserError(f"movie {self.movie.id!r} {where}: {path} leads outside the folders this run may read "
                            f"files from ({roots})" + (f" (through {outside[0]})" if outside[0] != real else ""),
                            "put the file under one of them (serve: start the server with --allow-files FOLDER)")
        return real


# --- validation -----------------------------------------------------------------------------------------------

_FIELDS_BY_MODEL = {m: list(m.model_fields) for m in (Style, Character, Frame, RenderSettings, Movie, PlanFile,
                                                       LoraEntry)}


def _json_path(loc: tuple[Any, ...], prefix: str = "$") -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """Walk `loc` through pydantic field annotations to find which model the last key belongs to."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return model if fields is not None else None
        ann = fields[part].annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        nested = [a for a in inner if issubclass(a, BaseModel)]
        if not nested:
            for a in getattr(ann, "__args__", ()):
                nested += [b for b in getattr(a, "__args__", ()) if isinstance(b, type) and issubclass(b, BaseModel)]
        model = nested[0] if nested else None
    return model


def _describe(err: dict[str, Any], root: type[BaseModel]) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        key = loc[-1]
        model = _model_at(loc[:-1], root)
        valid = _FIELDS_BY_MODEL.get(model, [])
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}"
        return f"unknown key {key!r}: {hint}"
    if kind == "missing":
        return f"required field {loc[-1]!r} is missing: add it"
    if kind == "too_short" and loc and loc[-1] in ("frames", "movies"):
        return f"{loc[-1]!r} is empty: add at least one entry"
    if kind == "literal_error" and loc and loc[-1] == "scheduler":
        return f"unknown scheduler {err.get('input')!r}: choose one of {', '.join(SCHEDULERS)}"
    if kind == "literal_error" and loc and loc[-1] == "seed_mode":
        return f"unknown seed_mode {err.get('input')!r}: choose one of {', '.join(SEED_MODES)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{msg} (got {err.get('input')!r})" if kind.endswith("_type") or kind.startswith("int_") else msg


def _semantic_problems(movies: list[Movie], paths: list[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen_movies: dict[str, str] = {}
    for movie, mpath in zip(movies, paths):
        if movie.id in seen_movies:
            problems.append((f"{mpath}.id", f"duplicate movie id {movie.id!r} (also at {seen_movies[movie.id]}): "
                                            "give every movie its own id"))
        seen_movies.setdefault(movie.id, mpath)
        if movie.consistency is not None and movie.render is not None and movie.render.consistency is not None:
            problems.append((f"{mpath}.consistency", "given twice (also in render.consistency): keep one"))
        names: dict[str, int] = {}
        for i, ch in enumerate(movie.characters):
            if ch.name in names:
                problems.append((f"{mpath}.characters[{i}].name",
                                 f"duplicate character name {ch.name!r}: names must be unique within a movie"))
            names.setdefault(ch.name, i)
        seen_frames: dict[str, int] = {}
        for i, frame in enumerate(movie.frames):
            if frame.id in seen_frames:
                problems.append((f"{mpath}.frames[{i}].id",
                                 f"duplicate frame id {frame.id!r} (also frames[{seen_frames[frame.id]}]): "
                                 "frame ids name the image files and must be unique within a movie"))
            seen_frames.setdefault(frame.id, i)
        for i, frame in enumerate(movie.frames):
            fpath = f"{mpath}.frames[{i}]"
            # A name in braces ("{Rosamund}") is an explicit character reference and must exist.
            for key in ("description", "camera"):
                for ref in re.findall(r"\{([^{}]+)\}", getattr(frame, key)):
                    if ref not in names:
                        problems.append((f"{fpath}.{key}", f"unknown character {{{ref}}}: "
                                                           f"{_name_fix(ref, names, 'or remove the braces')}"))
            if frame.speaker and not frame.dialogue:
                problems.append((f"{fpath}.speaker", f"speaker {frame.speaker!r} is set but 'dialogue' is empty: "
                                                     "add the line to 'dialogue', or remove 'speaker'"))
            elif frame.speaker and frame.speaker not in names:
                problems.append((f"{fpath}.speaker", f"unknown character {frame.speaker!r} as speaker: "
                                                     f"{_name_fix(frame.speaker, names, 'or leave speaker empty')}"))
            for k, name in enumerate(frame.shown):
                if name not in names:
                    problems.append((f"{fpath}.shown[{k}]", f"unknown character {name!r}: "
                                                            f"{_name_fix(name, names, 'or remove it from shown')}"))
    return problems


def _salvage(model: type[BaseModel], data: Any) -> Any:
    """`data` validated as `model` with the keys that fail left out (they are reported already); None when even
    that does not validate."""
    if not isinstance(data, dict):
        return None
    data = dict(data)
    while True:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            bad = {e["loc"][0] for e in exc.errors() if e["loc"]} & data.keys()
            if not bad:
                return None
            for key in bad:
                del data[key]


def _salvaged_movie(data: Any, index: int) -> Movie:
    """What of a movie that failed validation the cross-field checks can still look at: its characters' names and
    the frames that validate alone (others stand in as empty frames, so JSON paths keep their indices)."""
    data = data if isinstance(data, dict) else {}
    chars = []
    for i, c in enumerate(data.get("characters") if isinstance(data.get("characters"), list) else []):
        name = c.get("name") if isinstance(c, dict) else None
        chars.append(Character.model_construct(name=name.strip() if isinstance(name, str) else f"<character {i}>",
                                               appearance=""))
    frames = []
    for i, f in enumerate(data.get("frames") if isinstance(data.get("frames"), list) else []):
        frames.append(_salvage(Frame, f) or Frame.model_construct(
            id=f"<frame {i}>", description="", dialogue="", camera="", speaker="", shown=[], shot=None, seed=None))
    movie_id = data.get("id") if isinstance(data.get("id"), str) else f"<movie {index}>"
    return Movie.model_construct(id=movie_id, style=None, characters=chars, frames=frames, render=None,
                                 consistency=None, loras=[])


def _name_fix(name: str, names: dict[str, int], otherwise: str) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"did you mean {close[0]!r}?" if close else f"add it to 'characters' {otherwise}"


def parse_plan(data: Any, source: str = "<plan>", plan_dir: Path | None = None) -> list[LoadedMovie]:
    """Validate decoded JSON and return the movies with their render settings cascaded (file level)."""
    # Sizes first, whatever the type: json.loads only hits a RecursionError below the interpreter's recursion limit,
    # which other libraries raise (torch.compile does), and pydantic recurses and echoes oversized input in errors.
    problems = size_problems(data)
    if problems:
        raise PlanError(source, problems)
    if not isinstance(data, dict):
        raise PlanError(source, [("$", f"expected a JSON object, got {type(data).__name__}")])
    is_multi = "movies" in data
    root: type[BaseModel] = PlanFile if is_multi else Movie
    try:
        parsed = root.model_validate(data)
    except ValidationError as exc:
        problems = [(_json_path(e["loc"]), _describe(e, root)) for e in exc.errors()]
        # Every problem at once: the checks across fields (speakers, references, duplicates) run on what did
        # validate, so a misspelled speaker is not hidden behind a key typo until the next run.
        raw = data.get("movies") if is_multi else [data]
        raw = raw if isinstance(raw, list) else []
        paths = [f"$.movies[{i}]" for i in range(len(raw))] if is_multi else ["$"]
        problems += [p for p in _semantic_problems([_salvaged_movie(m, i) for i, m in enumerate(raw)], paths)
                     if p not in problems]
        raise PlanError(source, problems) from None
    if isinstance(parsed, PlanFile):
        movies, defaults = parsed.movies, parsed.defaults
        paths = [f"$.movies[{i}]" for i in range(len(movies))]
    else:
        movies, defaults, paths = [parsed], None, ["$"]
    problems = _semantic_problems(movies, paths)
    if problems:
        raise PlanError(source, problems)
    base = plan_dir or Path(".")
    out = []
    for m in movies:
        own = _paths_from(merge_settings(RenderSettings(consistency=m.consistency), m.render, defaults), base)
        out.append(LoadedMovie(movie=m, settings=merge_settings(own, BUILTIN_RENDER), plan_dir=base, own=own))
    return out


# --- size limits -------------------------------------------------------------------------------------------------
# Plans, LLM answers and user images are untrusted input: each bound is far above any real input and far below what
# exhausts a machine (a 1 MB description took 1.4 GB to tokenise). Each has an environment override, listed in
# docs/safety.md.

LIMITS = {  # name: (default, environment variable)
    "plan_bytes": (16 * 2**20, "MOVIELM_MAX_PLAN_BYTES"),
    "text_chars": (20_000, "MOVIELM_MAX_TEXT_CHARS"),
    "depth": (32, "MOVIELM_MAX_PLAN_DEPTH"),
    "prompt_windows": (16, "MOVIELM_MAX_PROMPT_WINDOWS"),
    "reply_bytes": (16 * 2**20, "MOVIELM_MAX_REPLY_BYTES"),  # an LLM's reply, read into memory whole
    "image_pixels": (8192 * 8192, "MOVIELM_MAX_IMAGE_PIXELS"),  # a user image for style training, decoded
}


def limit(name: str) -> int:
    """A size limit: its environment override if set, else the default; an override that is not a positive integer
    is a UserError (ignoring it would leave the user thinking it holds)."""
    default, env = LIMITS[name]
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{env}={text[:40]!r} is not a positive whole number",
                        f"set it to a number such as {default} (the default), or unset it")
    return value


def limit_hint(name: str) -> str:
    return f"or raise the limit with {LIMITS[name][1]}=N (now {limit(name)})"


def size_problems(data: Any) -> list[tuple[str, str]]:
    """Nesting deeper than the limit and strings longer than it, with their JSON paths (iterative: a deeply nested
    document must not exhaust the stack it is being checked for)."""
    max_depth, max_chars = limit("depth"), limit("text_chars")
    problems: list[tuple[str, str]] = []
    stack: list[tuple[Any, str, int]] = [(data, "$", 1)]
    while stack and len(problems) < 20:
        value, where, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth > max_depth:
            problems.append((where, f"nested more than {max_depth} levels deep: a plan needs about 5; "
                                    f"{limit_hint('depth')}"))
        elif isinstance(value, dict):
            stack += [(v, f"{where}.{k}", depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, str) and len(value) > max_chars:
            problems.append((where, f"text of {len(value):,} characters, over the limit of {max_chars:,}: shorten "
                                    f"it ({limit_hint('text_chars')})"))
    return sorted(problems)


def read_plan_text(path: Path) -> str:
    """A plan file's text, refusing what is not a regular file (a FIFO would block, /dev/zero never ends) and
    files over the size limit, before reading anything."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PlanError(str(path), [("$", "file not found: check the path")]) from None
    except OSError as exc:
        raise PlanError(str(path), [("$", f"cannot read the file ({exc.strerror or exc})")]) from None
    if not stat.S_ISREG(st.st_mode):
        raise PlanError(str(path), [("$", "not a regular file (a device, pipe or socket): pass a plan.json file")])
    if st.st_size > limit("plan_bytes"):
        raise PlanError(str(path), [("$", f"{st.st_size:,} bytes, over the plan size limit of "
                                          f"{limit('plan_bytes'):,}: split the plan into several files, "
                                          f"{limit_hint('plan_bytes')}")])
    try:
        with open(path, "rb") as fp:
            data = fp.read(limit("plan_bytes") + 1)  # the file may have grown since stat
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(str(path), [("$", f"cannot read the file ({exc}): it must be UTF-8 JSON")]) from None


def parse_json(text: str, source: str) -> Any:
    """json.loads with every failure (syntax, nesting beyond the interpreter's stack, oversized parts) a
    `PlanError`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(source, [("$", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) \
            from None
    except RecursionError:
        raise PlanError(source, [("$", f"nested more than {limit('depth')} levels deep: a plan needs about 5")]) \
            from None
    except ValueError as exc:  # a number of more digits than Python converts (a 5000-digit seed)
        raise PlanError(source, [("$", f"not valid JSON: {str(exc).split(':')[0]}: a seed has at most 19 digits")]) \
            from None
    return data


def load_plan(path: str | Path) -> list[LoadedMovie]:
    """Read and validate a plan file; every failure is a `PlanError` (a `UserError`)."""
    path = Path(path)
    data = parse_json(read_plan_text(path), str(path))
    source = str(path.resolve())
    return [lm.model_copy(update={"source": source}) for lm in parse_plan(data, str(path), path.parent)]


def plan_files(paths: Iterable[str | Path]) -> list[Path]:
    """The plan files that `paths` name, as every command reads them: a file as it is, a folder as all *.json in it
    (sorted). None at all is a UserError."""
    paths = list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"no plan files found in {', '.join(map(str, paths))}", "pass a plan.json or a folder of them")
    return files


SCHEMA_FILE = "docs/plan.schema.json"


def plan_schema() -> dict[str, Any]:
    """plan.json's JSON Schema, made from the models above: a file is one Movie or a PlanFile. SCHEMA_FILE is this,
    written by `python -m movielm_fast.plan` (a test keeps it current). Validation checks more than a schema can say
    (ids safe as file names, speakers among the characters, size limits): `parse_plan` is the authority."""
    schema = TypeAdapter(PlanFile | Movie).json_schema()
    for model in schema["$defs"].values():
        for field in model.get("properties", {}).values():
            for key in ("flag", "served", "metavar"):  # the CLI's and serve's metadata of a setting
                field.pop(key, None)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "movielm-fast plan.json, version 1",
            "description": "One movie object, or {\"version\": 1, \"defaults\": {render settings}, \"movies\": [...]}; "
                           "see docs/plans.md.", **schema}


if __name__ == "__main__":  # python -m movielm_fast.plan > docs/plan.schema.json
    print(json.dumps(plan_schema(), indent=1, ensure_ascii=False))
