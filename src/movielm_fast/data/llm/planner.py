"""Movie plans from themes: ask the LLM, check the answer with the same validation as `render`, write plan files.

One request per (theme, version). A plan file is named after its theme and version
(``<theme-slug>-<k>.json``), so a rerun skips what is already on disk; responses are cached as well, so an
interrupted batch also replays finished-but-unwritten requests for free.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from movielm_fast.errors import PlanError, UserError
from movielm_fast.paths import atomic_write_text
from movielm_fast.plan import SAFE_ID, SHOTS, limit, limit_hint, parse_plan

from .client import LLMClient, complete_json, prompt

_TEXT = {"type": "string"}

# Reply budget in tokens, sized from the request so that a model rambling under a grammar stops instead of
# generating until its context is full. About twice what a good answer needs: a frame (description, dialogue,
# shot, camera, speaker and their JSON keys) is 60-100 tokens, a character 30-50, title + overview + style 200-300.
TOKENS_PER_FRAME = 150
TOKENS_PER_CHARACTER = 80
TOKENS_OVERHEAD = 400


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


PLAN_SCHEMA = _object(
    title=_TEXT,
    overview=_TEXT,
    style=_object(name=_TEXT, description=_TEXT),
    characters={"type": "array", "items": _object(name=_TEXT, appearance=_TEXT)},
    frames={"type": "array", "items": _object(description=_TEXT, dialogue=_TEXT, shot={"type": "string",
                                                                                        "enum": list(SHOTS)},
                                              camera=_TEXT, speaker=_TEXT)},
)


# The example in plan_system.txt. Small models copy it word for word; such a copy is no plan for the theme.
EXAMPLE_TITLE = "The Duchess and the Commoner"
EXAMPLE_FRAME = "In the ballroom, Rosamund stands at the entrance with a confident smile."


def plan_schema(req: "PlanRequest") -> dict[str, Any]:
    """PLAN_SCHEMA with the frame and character counts asked for as array bounds. Servers that compile the schema to
    a grammar (llama.cpp, vLLM) then cannot stop after one frame or pad the cast; the tolerance of `count_range` is
    for answers that were not held to the schema. Servers that refuse the bounds are asked without them (the
    client's "json_schema_loose" mode)."""
    schema = copy.deepcopy(PLAN_SCHEMA)
    for key, wanted in (("frames", req.frames), ("characters", req.characters)):
        schema["properties"][key].update(minItems=wanted, maxItems=wanted)
    return schema


@dataclass(frozen=True)
class PlanRequest:
    theme: str
    genre: str | None = None
    frames: int = 30
    characters: int = 3
    version: int = 1
    count: int = 1
    strict_counts: bool = False
    """Exact frame and character counts; otherwise `count_range` is accepted, with a warning."""

    @property
    def max_tokens(self) -> int:
        return TOKENS_OVERHEAD + self.frames * TOKENS_PER_FRAME + self.characters * TOKENS_PER_CHARACTER

    @property
    def stem(self) -> str:
        width = max(2, len(str(self.count)))
        return f"{slugify(self.theme, 100)}-{self.version:0{width}d}"


def slugify(text: str, max_len: int = 80) -> str:
    """A SAFE_ID made from free text: ASCII letters, digits and dashes."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:max_len].strip("-")
    if not slug:
        slug = "movie-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    assert SAFE_ID.match(slug)
    return slug


def build_requests(themes: list[str], genre: str | None, frames: int, characters: int,
                   count: int, strict_counts: bool = False) -> list[PlanRequest]:
    """One request per (theme, version), before any is sent: a theme over the plan text limit, or two different
    themes whose file names (slugs) would be the same, is a UserError; a theme given twice is asked once."""
    seen: dict[str, str] = {}
    requests = []
    for theme in (t.strip() for t in themes):
        if not theme or seen.get(slugify(theme, 100)) == theme:
            continue
        if len(theme) > limit("text_chars"):
            raise UserError(f"a theme of {len(theme):,} characters ({theme[:40]!r}...) is over the limit of "
                            f"{limit('text_chars'):,}", f"shorten it ({limit_hint('text_chars')})")
        if (other := seen.setdefault(slugify(theme, 100), theme)) != theme:  # their plan files would be one file
            raise UserError(f"themes {other!r} and {theme!r} both make plan files named {slugify(theme, 100)}-*.json",
                            "reword one of them, or give it once")
        requests += [PlanRequest(theme, genre, frames, characters, k, count, strict_counts)
                     for k in range(1, count + 1)]
    if not requests:
        raise UserError("no themes given", "pass a theme, e.g. \"a love story\", or --themes-file with one per line")
    return requests


def read_themes_file(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read themes file {path}: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"themes file {path} is not UTF-8 text (byte {exc.start})",
                        "save it as UTF-8, one theme per line") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _variant_angle(version: int) -> str:
    text = resources.files("movielm_fast.data").joinpath("prompts", "plan_variants.txt").read_text(encoding="utf-8")
    angles = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return angles[(version - 1) % len(angles)]


def plan_messages(req: PlanRequest) -> list[dict[str, str]]:
    user = prompt("plan_user", theme=req.theme, genre=req.genre or "any genre that suits the theme",
                  characters=req.characters, frames=req.frames, variant=req.version, count=req.count,
                  angle=_variant_angle(req.version))
    return [{"role": "system", "content": prompt("plan_system")}, {"role": "user", "content": user}]


NEVER_FROM_LLM = {"$": ("loras", "render", "consistency"), "$.style": ("embedding", "loras", "token")}
"""What a plan written by an LLM never takes from its reply: files and models (embeddings, LoRAs, refiner and VAE
folders) are the user's to name, and a reply is untrusted text (it could name /etc/shadow, or a LoRA at scale 100).
Other keys outside the schema are reported back to the model for repair, as any invalid answer."""


def movie_from_reply(data: Any, req: PlanRequest, dropped: list[str] | None = None) -> dict[str, Any]:
    """Turn the model's answer into a plan movie object, or raise ValueError listing every problem. The JSON paths of
    what it gave of NEVER_FROM_LLM (left out) are put in `dropped`."""
    if not isinstance(data, dict):
        raise ValueError(f"- $: expected a JSON object, got {type(data).__name__}")
    style = data.get("style")
    given = {"$": data, "$.style": style if isinstance(style, dict) else {}}
    if dropped is not None:
        dropped[:] = [f"{where}.{k}" for where, keys in NEVER_FROM_LLM.items() for k in keys if given[where].get(k)]
    frames = data.get("frames")
    if isinstance(frames, list):
        frames = [_without_silent_speaker(f) for f in frames]
    movie = {
        "id": slugify(str(data.get("title") or req.theme)),
        "title": data.get("title", ""),
        "theme": req.theme,
        "overview": data.get("overview", ""),
        "style": {**{k: v for k, v in style.items() if k not in NEVER_FROM_LLM["$.style"]}, "embedding": None}
        if isinstance(style, dict) else style,
        "characters": data.get("characters"),
        "frames": [_numbered_frame(f, i, len(frames)) for i, f in enumerate(frames)]
        if isinstance(frames, list) else frames,
    }
    movie = {k: v for k, v in movie.items() if v is not None}
    problems = _count_problems(data, req)
    try:
        [loaded] = parse_plan(movie, source="reply")
    except PlanError as exc:
        problems = [f"- {path}: {msg}" for path, msg in exc.problems] + problems
    if problems:
        raise ValueError("\n".join(problems))
    # The file gets the canonical shot names ("Close_up" -> "close-up"), as render will read them.
    for frame, parsed in zip(movie["frames"], loaded.movie.frames):
        if parsed.shot is not None:
            frame["shot"] = parsed.shot
    return movie


def _numbered_frame(frame: Any, index: int, total: int) -> Any:
    if not isinstance(frame, dict):
        return frame
    return {**frame, "id": f"{index + 1:0{max(3, len(str(total)))}d}", "seed": None}


def _without_silent_speaker(frame: Any) -> Any:
    """A schema that requires every key makes models name a speaker for frames without a line; dropping it loses
    nothing, while sending it back would cost a repair round trip."""
    if isinstance(frame, dict) and not str(frame.get("dialogue") or "").strip() and "speaker" in frame:
        return {k: v for k, v in frame.items() if k != "speaker"}
    return frame


def count_range(wanted: int, strict: bool) -> tuple[int, int]:
    """Accepted counts: exactly `wanted` when strict, else within 25% of it and at least 2 either way (never 0)."""
    if strict:
        return wanted, wanted
    slack = max(2, int(0.25 * wanted))
    return max(1, wanted - slack), wanted + slack


def _count_problems(data: dict[str, Any], req: PlanRequest) -> list[str]:
    problems = []
    for key, wanted in (("frames", req.frames), ("characters", req.characters)):
        got = data.get(key)
        lo, hi = count_range(wanted, req.strict_counts)
        if not isinstance(got, list):
            problems.append(f"- $.{key}: missing or not a list: give a list of exactly {wanted}")
        elif req.strict_counts and len(got) != wanted:
            problems.append(f"- $.{key}: has {len(got)} entries, exactly {wanted} are required")
        elif not lo <= len(got) <= hi:
            problems.append(f"- $.{key}: has {len(got)} entries, {wanted} were asked for: give exactly {wanted} "
                            f"({lo} to {hi} are accepted)")
    if not str(data.get("title") or "").strip():
        problems.append("- $.title: the title is empty: give the movie a title")
    elif str(data["title"]).strip().casefold() == EXAMPLE_TITLE.casefold():
        problems.append(f"- $.title: {EXAMPLE_TITLE!r} is the example from the instructions: write a new movie on "
                        f"the theme {req.theme!r}")
    for i, frame in enumerate(data.get("frames") if isinstance(data.get("frames"), list) else []):
        if isinstance(frame, dict) and str(frame.get("description") or "").strip() == EXAMPLE_FRAME:
            problems.append(f"- $.frames[{i}].description: copied from the example in the instructions: describe "
                            "a scene of this movie")
    return problems


def count_warnings(movie: dict[str, Any], req: PlanRequest) -> list[str]:
    """Accepted counts that differ from the request, for the run summary."""
    out = []
    for key, wanted in (("frames", req.frames), ("characters", req.characters)):
        got = len(movie.get(key) or [])
        if got != wanted:
            out.append(f"{got} {key} instead of {wanted} (accepted within 25%, at least 2; --strict-counts asks for "
                       "exact counts)")
    return out


# --- batch ------------------------------------------------------------------------------------------------------


@dataclass
class PlanOutcome:
    request: PlanRequest
    path: Path | None = None
    error: str | None = None
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class PlanReport:
    outcomes: list[PlanOutcome] = field(default_factory=list)

    @property
    def failures(self) -> list[PlanOutcome]:
        return [o for o in self.outcomes if o.error]

    @property
    def written(self) -> list[PlanOutcome]:
        return [o for o in self.outcomes if o.path and not o.skipped]


class _IdRegistry:
    """Movie ids must be unique across the output folder, since they name the render folders."""

    def __init__(self, out_dir: Path):
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        for path in out_dir.glob("*.json"):
            try:
                self._ids.add(json.loads(path.read_text(encoding="utf-8"))["id"])
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def claim(self, wanted: str) -> str:
        with self._lock:
            candidate, n = wanted, 1
            while candidate in self._ids:
                n += 1
                candidate = f"{wanted[:120]}-{n}"
            self._ids.add(candidate)
            return candidate


def plan_writer(client: LLMClient, out_dir: Path, max_tries: int = 3) -> Callable[[PlanRequest], PlanOutcome]:
    """A function that answers one request into `out_dir` (thread-safe: movie ids stay unique across the folder),
    for callers that schedule requests themselves (`generate_plans`, `make`)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out_dir}: {exc.strerror or exc}", "choose a writable folder with --out") \
            from None
    ids = _IdRegistry(out_dir)
    return lambda req: _generate_one(client, req, out_dir, ids, max_tries)


def generate_plans(client: LLMClient, requests: list[PlanRequest], out_dir: Path, max_tries: int = 3,
                   on_done: Callable[[PlanOutcome], None] | None = None) -> PlanReport:
    """Generate every request concurrently; a failure is recorded on its outcome and the others go on."""
    write = plan_writer(client, out_dir, max_tries)

    def run(req: PlanRequest) -> PlanOutcome:
        try:
            outcome = write(req)
        except Exception as exc:  # an OS error writing its file, or a bug: this request only, the others are kept
            outcome = PlanOutcome(req, error=str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        if on_done:
            on_done(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, client.config.concurrency)) as pool:
        return PlanReport(list(pool.map(run, requests)))


def _generate_one(client: LLMClient, req: PlanRequest, out_dir: Path, ids: _IdRegistry,
                  max_tries: int) -> PlanOutcome:
    path = out_dir / f"{req.stem}.json"
    if _valid_plan_file(path):
        return PlanOutcome(req, path, skipped=True)
    label = f"plan for {req.theme!r} (version {req.version})"
    dropped: list[str] = []
    try:
        movie = complete_json(client, plan_messages(req), lambda d: movie_from_reply(d, req, dropped),
                              plan_schema(req), out_dir / "failed" / f"{req.stem}.raw.txt", label, max_tries,
                              "movie_plan", req.max_tokens)
    except UserError as exc:
        return PlanOutcome(req, error=str(exc))
    # The id is the request's, never the reply's title: a title-made id would depend on which of two plans with the
    # same title was answered first, and a resumed run would differ from a clean one.
    movie["id"] = ids.claim(req.stem)
    # Distinct movies get distinct noise even when nobody sets a seed.
    movie["render"] = {"seed": int(hashlib.sha256(movie["id"].encode()).hexdigest()[:8], 16)}
    parse_plan(movie, source=str(path))
    atomic_write_text(path, json.dumps(movie, indent=2, ensure_ascii=False) + "\n")
    notes = [f"the reply also gave {', '.join(dropped)}: left out (a plan written by an LLM never names files or "
             "models; add them to the plan yourself)"] if dropped else []
    return PlanOutcome(req, path, warnings=count_warnings(movie, req) + notes)


def _valid_plan_file(path: Path) -> bool:
    try:
        parse_plan(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    except (OSError, ValueError, UserError):
        return False
    return True
