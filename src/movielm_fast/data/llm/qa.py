"""MovieLLM question-answer pairs for a movie: from the LLM, derived from the plan itself, or both.

Output per movie (MovieLLM's format plus our movie id and a digest of the story it is about, `story_digest`)::

    {"movie_id", "movie_title", "story", "QA": {"overview_qa": [...], "plot_qa": [...], "temporal_qa": [...],
                                                 "character_qa": [...]}}

with every pair ``{"question": str, "answer": str}``. The LLM answers the first three; derived pairs need no
LLM and are deterministic: temporal order and shot order, characters and who says which line, each answer copied
from the plan.

Real models answer in many near-miss shapes, so an LLM answer is normalised before it is checked: keys in any
case ("Question", "Plot_QA"), MovieLLM's own ``{"movie_title": ..., "QA": {...}}`` wrapper, one pair where a
one-element list was asked for. Extra pairs are kept, up to twice the number asked for; a missing group is still
sent back for repair.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_text
from movielm_fast.plan import Movie

from .client import LLMClient, complete_json, prompt
from .planner import count_range

Source = Literal["llm", "derived", "both"]
LLM_KINDS = ("overview_qa", "plot_qa", "temporal_qa")
QA_KINDS = (*LLM_KINDS, "character_qa")

_PAIR = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
         "required": ["question", "answer"], "additionalProperties": False}
QA_SCHEMA = {"type": "object", "properties": {k: {"type": "array", "items": _PAIR} for k in LLM_KINDS},
             "required": list(LLM_KINDS), "additionalProperties": False}
# Reply budget: about twice what a pair of one-sentence question and answer needs, plus the JSON around them.
TOKENS_PER_PAIR = 120
TOKENS_OVERHEAD = 200
EXTRA_PAIRS_FACTOR = 2
"""Pairs kept per group: up to this many times the number asked for."""


def pair(question: str, answer: str) -> dict[str, str]:
    return {"question": question, "answer": answer}


# --- from the LLM -----------------------------------------------------------------------------------------------


def qa_messages(movie: Movie, plot_count: int) -> list[dict[str, str]]:
    characters = "\n".join(f"- {c.name}: {c.appearance}" for c in movie.characters) or "- (none listed)"
    frames = "\n".join(f"{i}. {_plain(f.description)}" + _dialogue_note(f) for i, f in enumerate(movie.frames, 1))
    user = prompt("qa_user", title=movie.title or movie.id, overview=movie.overview or "(none)",
                  characters=characters, frames=frames)
    return [{"role": "system", "content": prompt("qa_system", plot_count=plot_count)},
            {"role": "user", "content": user}]


def _dialogue_note(frame) -> str:
    if not frame.dialogue:
        return ""
    return f' Dialogue ({frame.speaker}): "{frame.dialogue}"' if frame.speaker else f' Dialogue: "{frame.dialogue}"'


def qa_max_tokens(plot_count: int) -> int:
    return TOKENS_OVERHEAD + (plot_count + 2) * TOKENS_PER_PAIR


_KNOWN_KEYS = {k.replace("_", ""): k for k in (*LLM_KINDS, "question", "answer", "qa")}


def _key(key: Any) -> str:
    """"Overview_QA", "overview-qa", "overviewQA" -> "overview_qa"; unknown keys stay as they are."""
    return _KNOWN_KEYS.get(re.sub(r"[\s_-]+", "", str(key).strip().lower()), str(key))


def normalise_qa(data: Any) -> Any:
    """Undo the near-miss shapes real models answer in (see the module docstring); anything else is left as it
    is, for `check_llm_qa` to report."""
    if not isinstance(data, dict):
        return data
    data = {_key(k): v for k, v in data.items()}
    if isinstance(data.get("qa"), dict) and not any(kind in data for kind in LLM_KINDS):
        data = {_key(k): v for k, v in data["qa"].items()}
    for kind in LLM_KINDS:
        pairs = data.get(kind)
        if isinstance(pairs, dict):
            pairs = [pairs]
        if isinstance(pairs, list):
            data[kind] = [{_key(k): v for k, v in p.items()} if isinstance(p, dict) else p for p in pairs]
    return data


def check_llm_qa(data: Any, plot_count: int, strict: bool = False) -> dict[str, list[dict[str, str]]]:
    """Keep the three MovieLLM lists; raise ValueError listing every problem so the model can fix them. Fewer plot
    pairs than asked are accepted by the rule plans' counts follow (planner.count_range: within 25%, at least 2)
    unless `strict`."""
    data = normalise_qa(data)
    if not isinstance(data, dict):
        raise ValueError(f"- $: expected a JSON object, got {type(data).__name__}")
    wanted = {"overview_qa": 1, "plot_qa": plot_count, "temporal_qa": 1}
    problems, result = [], {}
    for kind, count in wanted.items():
        pairs = data.get(kind)
        if not isinstance(pairs, list):
            problems.append(f"- $.{kind}: missing or not a list: give exactly {count} pair(s)")
            continue
        good = [pair(p["question"].strip(), p["answer"].strip()) for p in pairs if _is_pair(p)]
        if len(good) < len(pairs):
            problems.append(f"- $.{kind}: every entry must be {{\"question\": text, \"answer\": text}}, "
                            "both non-empty")
        elif len(good) < (least := count_range(count, strict)[0]):
            problems.append(f"- $.{kind}: has {len(good)} pair(s), " + (f"exactly {count} are required" if least ==
                            count else f"{count} were asked for: give {count} (at least {least} are accepted)"))
        result[kind] = good[:EXTRA_PAIRS_FACTOR * count]
    if problems:
        raise ValueError("\n".join(problems))
    return result


def _is_pair(p: Any) -> bool:
    return (isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str)
            and bool(p["question"].strip()) and bool(p["answer"].strip()))


def llm_qa(client: LLMClient, movie: Movie, plot_count: int, raw_dir: Path,
           max_tries: int = 3, strict: bool = False) -> dict[str, list[dict[str, str]]]:
    return complete_json(client, qa_messages(movie, plot_count), lambda d: check_llm_qa(d, plot_count, strict),
                         QA_SCHEMA, Path(raw_dir) / f"{movie.id}.raw.txt", f"QA for movie {movie.id!r}",
                         max_tries, "movie_qa", qa_max_tokens(plot_count))


# --- derived from the plan --------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    """Character references in braces are for the renderer; a viewer reads plain names."""
    return re.sub(r"\{([^{}]+)\}", r"\1", text).strip()


def _scene(text: str) -> str:
    return _plain(text).rstrip(" .!")


def _spread(n: int, k: int) -> list[int]:
    """Up to k indices spread evenly over range(n), so questions cover the whole movie."""
    k = min(k, n)
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _appears(name: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", _plain(text)) is not None


def derived_temporal(movie: Movie, limit: int = 5) -> list[dict[str, str]]:
    scenes = [_scene(f.description) for f in movie.frames]
    n = len(scenes)
    if n < 2:
        return []
    out = [pair("How does the movie begin?", f"{scenes[0]}."), pair("How does the movie end?", f"{scenes[-1]}.")]
    out += [pair(f'What happens right after this scene: "{scenes[i]}"?', f"{scenes[i + 1]}.")
            for i in _spread(n - 1, limit)]
    gap = max(1, n // 3)
    for m, i in enumerate(_spread(n - gap, limit)):
        earlier, later = scenes[i], scenes[i + gap]
        # Alternate which option is named first so the answer is not always the first one offered.
        a, b = (later, earlier) if m % 2 == 0 else (earlier, later)
        out.append(pair(f'Which comes first: "{a}" or "{b}"?',
                        f'"{earlier}" comes first; "{later}" happens later.'))
    return out


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def derived_shots(movie: Movie, limit: int = 5) -> list[dict[str, str]]:
    """The order of shot sizes, where the plan has them (frames without a shot are left out)."""
    frames = movie.frames
    out = []
    if frames[0].shot:
        out.append(pair("How is the opening scene framed?", f"As {_article(frames[0].shot)} {frames[0].shot} shot."))
    # Pairs of consecutive frames that both name a shot.
    steps = [i for i in range(len(frames) - 1) if frames[i].shot and frames[i + 1].shot]
    for k in _spread(len(steps), limit):
        i = steps[k]
        shot, after = frames[i].shot, frames[i + 1].shot
        out.append(pair(f'The scene "{_scene(frames[i].description)}" is {_article(shot)} {shot} shot. '
                        "How is the scene right after it framed?",
                        f"As {_article(after)} {after} shot: {_scene(frames[i + 1].description)}."))
    run = 0
    while run < min(len(frames), limit) and frames[run].shot:
        run += 1
    if run >= 3:
        sequence = ", then ".join(f"{_article(f.shot)} {f.shot} shot" for f in frames[:run])
        out.append(pair(f"In what order are the first {run} scenes framed?", sequence[0].upper() + sequence[1:] + "."))
    return out


def derived_speakers(movie: Movie, limit: int = 5) -> list[dict[str, str]]:
    """Who says which line; a line that several characters say is skipped (it has no single answer)."""
    said: dict[str, set[str]] = {}
    for f in movie.frames:
        if f.dialogue and f.speaker:
            said.setdefault(_line(f.dialogue), set()).add(f.speaker)
    lines = [(_line(f.dialogue), f.speaker) for f in movie.frames
             if f.dialogue and f.speaker and len(said[_line(f.dialogue)]) == 1]
    lines = list(dict.fromkeys(lines))  # a line repeated by the same speaker is asked once
    return [pair(f'Who says "{lines[i][0]}"?', f"{lines[i][1]}.") for i in _spread(len(lines), limit)]


def _line(dialogue: str) -> str:
    return dialogue.strip().strip('"\u201c\u201d').strip()


def derived_characters(movie: Movie) -> list[dict[str, str]]:
    if not movie.characters:
        return []
    names = [c.name for c in movie.characters]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    out = [pair("Who are the main characters?",
                f"The main character{'s are' if len(names) > 1 else ' is'} {listed}.")]
    n = len(movie.frames)
    for ch in movie.characters:
        out.append(pair(f"What does {ch.name} look like?", f"{ch.name} is {ch.appearance.rstrip(' .')}."))
        scenes = [i for i, f in enumerate(movie.frames) if _appears(ch.name, f.description)]
        if not scenes:
            continue
        first = scenes[0]
        out.append(pair(f"When does {ch.name} first appear?",
                        f"In scene {first + 1} of {n}: {_scene(movie.frames[first].description)}."))
        out.append(pair(f"In how many scenes does {ch.name} appear?",
                        f"{ch.name} appears in {len(scenes)} of the {n} scenes."))
    return out


def derived_qa(movie: Movie, limit: int = 5) -> dict[str, list[dict[str, str]]]:
    overview = [pair("What is this movie about?", movie.overview)] if movie.overview else []
    return {"overview_qa": overview, "plot_qa": [],
            "temporal_qa": derived_temporal(movie, limit) + derived_shots(movie, limit),
            "character_qa": derived_characters(movie) + derived_speakers(movie, limit)}


# --- per movie and in batch -------------------------------------------------------------------------------------


def story_digest(movie: Movie) -> str:
    """A digest of what QA is about (title, overview, characters, and each frame's story): QA written for one movie
    is never attached to another that shares its id (dataset.export_dataset checks it)."""
    story = {"title": movie.title, "overview": movie.overview,
             "characters": [c.model_dump() for c in movie.characters],
             "frames": [f.model_dump(include={"id", "description", "dialogue", "speaker", "shot", "camera"})
                        for f in movie.frames]}
    return hashlib.sha256(json.dumps(story, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def movie_record(movie: Movie, qa: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    return {"movie_id": movie.id, "movie_title": movie.title or movie.id, "story": story_digest(movie),
            "QA": {kind: list(qa.get(kind, [])) for kind in QA_KINDS}}


def merge(*parts: dict[str, list[dict[str, str]]]) -> dict[str, list[dict[str, str]]]:
    return {kind: [p for part in parts for p in part.get(kind, [])] for kind in QA_KINDS}


@dataclass
class QAJob:
    source: Source = "both"
    plot_count: int = 5
    derived_limit: int = 5
    max_tries: int = 3
    raw_dir: Path = Path("qa.failed")
    strict_counts: bool = False
    """Require exactly `plot_count` plot pairs (default: within 25%, at least 2, as plans' counts)."""


def qa_for_movie(movie: Movie, job: QAJob, client: LLMClient | None) -> dict[str, Any]:
    parts = []
    if job.source in ("llm", "both"):
        if client is None:
            raise UserError("LLM QA needs an LLM endpoint", "configure one, or use --source derived")
        parts.append(llm_qa(client, movie, job.plot_count, job.raw_dir, job.max_tries, job.strict_counts))
    if job.source in ("derived", "both"):
        parts.append(derived_qa(movie, job.derived_limit))
    return movie_record(movie, merge(*parts))


def generate_qa(movies: list[Movie], job: QAJob,
                client: LLMClient | None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """QA for every movie, concurrently; returns (records in movie order, [(movie id, error)])."""

    def run(movie: Movie) -> dict[str, Any] | tuple[str, str]:
        try:
            return qa_for_movie(movie, job, client)
        except UserError as exc:
            return movie.id, str(exc)
        except Exception as exc:  # a bug or an OS error: this movie only, the others' QA is kept
            return movie.id, f"{type(exc).__name__}: {exc}"

    workers = client.config.concurrency if client else 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(run, movies))
    return [r for r in results if isinstance(r, dict)], [r for r in results if isinstance(r, tuple)]


def write_qa(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(path), json.dumps(records, indent=2, ensure_ascii=False) + "\n")
