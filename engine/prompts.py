"""Frame prompt = style prefix + frame description with character names replaced by their appearance."""

from __future__ import annotations

import re

from .plan import Frame, Movie


def style_prefix(movie: Movie, style_token: str | None) -> str:
    if style_token:
        return f"{style_token}, "
    parts = [f"{movie.style.name} style", movie.style.description]
    return ", ".join(p for p in parts if p) + ", "


def substitute_characters(text: str, movie: Movie) -> str:
    """Whole-word, case-sensitive, longest name first, in one pass (so an appearance is never substituted into).
    ``{Name}`` is an explicit reference and loses its braces."""
    if not movie.characters:
        return text
    appearance = {c.name: c.appearance for c in movie.characters}
    names = sorted(appearance, key=len, reverse=True)
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, names)) + r")\}|(?<!\w)(" +
                         "|".join(map(re.escape, names)) + r")(?!\w)")
    return pattern.sub(lambda m: appearance[m.group(1) or m.group(2)], text)


def frame_prompt(movie: Movie, frame: Frame, style_token: str | None = None) -> str:
    return style_prefix(movie, style_token) + substitute_characters(frame.description, movie)
