"""Frame prompt = style prefix + framing (shot, camera) + frame description with character names replaced by their
appearance.

The order is fixed: ``"<style prefix>, <shot> shot, <camera>, <description>"``. The style comes first so that a
learned style token keeps its place; the framing words come before the scene because they say how the whole image
is composed. A frame without shot and camera gets exactly the prompt it had before those fields existed, so
resume keys of rendered movies stay valid.

In consistency mode each character has a token of its own (style.characters), which follows its appearance
wherever the appearance goes; a character the frame shows without naming it (`shown`, the speaker) is added at the
end as its appearance and token.
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


def _appearances(movie: Movie, tokens: dict[str, str] | None) -> dict[str, str]:
    """Name -> what replaces it: the character's token when it has one, then its appearance (the token before the
    words it qualifies, as DreamBooth's "a sks dog": CLIP's text encoder is causal, so a token can shape only the
    words after it; in the toy world either place measured the same, bench/RESULTS.md)."""
    tokens = tokens or {}
    return {c.name: f"{tokens[c.name]} {c.appearance}" if c.name in tokens else c.appearance
            for c in movie.characters}


def substitute_characters(text: str, movie: Movie, tokens: dict[str, str] | None = None) -> str:
    """Each character name replaced by the character's appearance (and token: consistency mode), in one pass (so an
    appearance is never substituted into); ``{Name}`` loses its braces."""
    if not movie.characters:
        return text
    appearance = _appearances(movie, tokens)
    return _names_pattern(movie).sub(lambda m: appearance[m.group(1) or m.group(2)], text)


def named_characters(movie: Movie, frame: Frame) -> list[str]:
    """The characters a frame's description names, in order of first mention (the same matching as
    substitute_characters)."""
    if not movie.characters:
        return []
    found = (m.group(1) or m.group(2) for m in _names_pattern(movie).finditer(frame.description))
    return list(dict.fromkeys(found))


def frame_characters(movie: Movie, frame: Frame) -> list[str]:
    """The characters a frame shows: those its description names, then those it lists as `shown` (a character it
    calls "she" or "the detective"), then its speaker."""
    return list(dict.fromkeys([*named_characters(movie, frame), *frame.shown, *filter(None, [frame.speaker])]))


def framing(movie: Movie, frame: Frame, tokens: dict[str, str] | None = None) -> str:
    """``"close-up shot, low angle, "`` -- empty when the frame names neither."""
    parts = [f"{frame.shot} shot" if frame.shot else "", substitute_characters(frame.camera, movie, tokens)]
    return "".join(f"{p}, " for p in parts if p)


def frame_prompt(movie: Movie, frame: Frame, style_token: str | None = None, tokens: dict[str, str] | None = None
                 ) -> str:
    """`tokens`: character name -> its token (consistency mode); None: the prompt as without the mode."""
    prompt = style_prefix(movie, style_token) + framing(movie, frame, tokens) + \
        substitute_characters(frame.description, movie, tokens)
    if tokens:
        appearance = _appearances(movie, tokens)
        unnamed = [n for n in frame_characters(movie, frame) if n not in named_characters(movie, frame)]
        prompt += "".join(f", {appearance[n]}" for n in unnamed)
    return prompt
