"""The built-in planner for the demo model (`make --llm demo`): themes -> plans and QA with no LLM, offline.

It is not a language model and does not understand a theme: from each theme and version it draws, deterministically,
a small story in the only words the demo model can draw (engine.demo_vocabulary): characters that are coloured
shapes, frames that put them at the left, the centre or the right of one of five backgrounds, in one of five
styles. Every plan says so in its title and overview. What it gives is the whole of `make` -- plans, frames, QA,
dataset, gallery -- on a machine without an LLM, in the vocabulary the demo model was trained on.

QA comes from the plan itself: where each character is in a scene and what it looks like (plot_qa), with the
derived pairs every plan gets (data.llm.qa.derived_qa).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

from movielm_fast.engine.demo_vocabulary import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
)
from movielm_fast.plan import Movie

from .llm import qa
from .llm.planner import PlanOutcome, PlanRequest, plan_writer_with, save_plan, slugify

LABEL = "the demo model's built-in planner (no LLM)"
NAMES = ("Rosa", "Tri", "Sunny", "Moon", "Pip", "Dot", "Max", "Ivy", "Bo", "Kit", "Lu", "Ned")
OPENING = ("So it begins.", "What a fine day.", "Here we go.")
MIDDLE = ("Follow me!", "Over here!", "Look at that.", "Not so fast.", "Wait for me!", "Where are you?",
          "This way.", "Did you see that?", "Keep going.", "Almost there.")
CLOSING = ("We did it.", "Time to rest.", "Good night.")


def demo_movie(req: PlanRequest) -> dict[str, Any]:
    """The plan (a movie object) for one request: the same for the same theme, version and counts."""
    seed = int.from_bytes(hashlib.sha256(json.dumps([req.theme, req.version]).encode()).digest()[:8], "little")
    rng = random.Random(seed)
    looks = rng.sample([(colour, shape) for colour in COLOURS for shape in SHAPES], min(req.characters, len(NAMES)))
    names = rng.sample(NAMES, len(looks))
    characters = [{"name": name, "appearance": f"a {rng.choice(SIZES)} {colour} {shape}"}
                  for name, (colour, shape) in zip(names, looks)]
    route = rng.sample(BACKGROUNDS, min(len(BACKGROUNDS), max(2, req.frames // 3)))  # where the story goes
    frames = []
    for i in range(req.frames):
        background = route[i * len(route) // req.frames]
        shown = rng.sample(names, rng.randint(1, min(len(names), len(POSITIONS))))
        places = sorted(rng.sample(POSITIONS, len(shown)), key=POSITIONS.index)
        where = [f"{name} {POSITION_PHRASES[place]}" for name, place in zip(shown, places)]
        line = OPENING if i == 0 else CLOSING if i == req.frames - 1 else MIDDLE
        frames.append({"id": f"{i + 1:0{max(3, len(str(req.frames)))}d}",
                       "description": f"{_listed(where)}, {BACKGROUND_PHRASES[background]}",
                       "dialogue": rng.choice(line), "speaker": rng.choice(shown)})
    cast = _listed([c["appearance"] for c in characters])
    places = ", then ".join(BACKGROUND_PHRASES[b] for b in route)
    title = f"{req.theme[:1].upper()}{req.theme[1:]} (demo plan {req.version})"
    return {"id": slugify(title), "title": title, "theme": req.theme,
            "overview": f"A demo plan by {LABEL} for the theme {req.theme!r}, in the words the demo model can draw: "
                        f"{cast} meet {places}.",
            "style": {"name": rng.choice(STYLES).capitalize(), "description": ""},
            "characters": characters, "frames": frames}


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def plan_writer(out_dir: Path) -> Callable[[PlanRequest], PlanOutcome]:
    """As data.llm.planner.plan_writer, with the demo plans: existing plan files are kept."""
    return plan_writer_with(out_dir, lambda req, path, claim: PlanOutcome(req, save_plan(demo_movie(req), path,
                                                                                          claim)))


# --- QA from the plan ----------------------------------------------------------------------------------------------

_PLACE = {phrase: place for place, phrase in POSITION_PHRASES.items()}
_BACKGROUND = re.compile("(" + "|".join(map(re.escape, BACKGROUND_PHRASES.values())) + r")\s*$")


def plot_qa(movie: Movie, count: int) -> list[dict[str, str]]:
    """Where each character is in some of the scenes, and where those scenes are, read from the descriptions
    (sentences that do not follow the demo plans' grammar are left out)."""
    pairs = []
    for i in qa.spread(len(movie.frames), count):
        frame = movie.frames[i]
        background = _BACKGROUND.search(frame.description)
        if background:
            pairs.append(qa.pair(f"Where does scene {i + 1} take place?", f"{background.group(1).capitalize()}."))
        for c in movie.characters:
            at = re.search(rf"\b{re.escape(c.name)} ({'|'.join(map(re.escape, _PLACE))})", frame.description)
            if at:
                pairs.append(qa.pair(f"Where is {c.name} in scene {i + 1}?",
                                     f"{at.group(1).capitalize()}: {c.name} is {c.appearance}."))
    return pairs


def qa_for_movie(movie: Movie, job: qa.QAJob) -> dict[str, Any]:
    """As data.llm.qa.qa_for_movie, with the planner's own pairs where an LLM would answer."""
    parts = []
    if job.source in ("llm", "both"):
        parts.append({"plot_qa": plot_qa(movie, job.plot_count)})
    if job.source in ("derived", "both"):
        parts.append(qa.derived_qa(movie, job.derived_limit))
    return qa.movie_record(movie, qa.merge(*parts))
