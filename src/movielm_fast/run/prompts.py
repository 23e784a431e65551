"""Frame prompt = style prefix + framing (shot, camera) + frame description with character names replaced by their
appearance.

The order is fixed: ``"<style prefix>, <shot> shot, <camera>, <description>"``. The style comes first so that a
learned style token keeps its place; the framing words come before the scene because they say how the whole image
is composed. A frame without shot and camera gets exactly the prompt it had before those fields existed, so
resume keys of rendered movies stay valid.
"""

from __future__ import annotations

import re

from movielm_fast.plan import Frame, Movie


def style_prefix(movie: Movie, style_token: str | None) -> str:
    if style_token:
        return f"{style_token}, "
    parts = [f"{movie.style.name} style", movie.style.description]
    return ", ".join(p for p in parts if p) + ", "


def _names_pattern(movie: Movie) -> re.Pattern:
    """Character names, whole-word and case-sensitive, longest first; ``{Name}`` is an explicit reference."""
    names = sorted((c.name for c in movie.characters), key=len, reverse=True)
    alt = "|".join(map(re.escape, names))
    return re.compile(r"\{(" + alt + r")\}|(?<!\w)(" + alt + r")(?!\w)")


def substitute_characters(text: str, movie: Movie) -> str:
    """Each character name replaced by the character's appearance, in one pass (so an appearance is never
    substituted into); ``{Name}`` loses its braces."""
    if not movie.characters:
        return text
    appearance = {c.name: c.appearance for c in movie.characters}
    return _names_pattern(movie).sub(lambda m: appearance[m.group(1) or m.group(2)], text)


def frame_characters(movie: Movie, frame: Frame) -> list[str]:
    """The characters a frame's description names, in order of first mention (the same matching as
    substitute_characters)."""
    if not movie.characters:
        return []
    found = (m.group(1) or m.group(2) for m in _names_pattern(movie).finditer(frame.description))
    return list(dict.fromkeys(found))


def framing(movie: Movie, frame: Frame) -> str:
    """``"close-up shot, low angle, "`` -- empty when the frame names neither."""
    parts = [f"{frame.shot} shot" if frame.shot else "", substitute_characters(frame.camera, movie)]
    return "".join(f"{p}, " for p in parts if p)


def frame_prompt(movie: Movie, frame: Frame, style_token: str | None = None) -> str:
    return style_prefix(movie, style_token) + framing(movie, frame) + substitute_characters(frame.description, movie)
