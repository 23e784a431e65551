"""An analytic judge for the toy world: reads a 64x64 image back into a scene and scores it against a caption.

No learned weights: every decision is a nearest-template match against the world's own renderer.
- background and style together: the row means of the bands above and below the shapes (which only the background
  touches) against those of the 25 empty (background, style) scenes;
- each position's colour: the mean of a small box at the position's centre against an empty scene's box and a
  shape of each colour, in the judged background and style;
- shape and size, where a colour was found: a window around the position against the world's rendering of each
  shape and size there in that colour, background and style. (The fill of the bounding box of the pixels nearer
  the colour than the background, used before, found the right shape at 61% of the named positions of 150
  held-out scenes passed through the demo VAE -- a blurred small triangle fills its box like a circle; the overlap
  of that mask with each shape's, 80%; the nearest rendering, 86%. All three read ground truth perfectly.)
A colour read is *pure* when its nearest template is at most PURE_RATIO times as far as the next nearest: a blend of
two colours (what a model draws when it cannot decide) sits about as far from both.

Open attributes (what a description leaves to the seed) are read the same way; `agreement` turns a character's
readings over a movie into the consistency figures: how often its open attributes equal its anchor's, and its most
common appearance's.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import world as W

EMPTY = "none"
_BOX = (slice(W.CENTRE_Y - 1, W.CENTRE_Y + 4), {p: slice(x - 2, x + 3) for p, x in W.POS_X.items()})
_WIN = 11  # half-size of the window in which a shape's mask is measured
PURE_RATIO = 0.5


def _as_float(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    a = a.astype(np.float32)
    return a / 255.0 if a.max() > 1.5 else a


def _band_signature(img: np.ndarray) -> np.ndarray:
    return np.concatenate([img[W.TOP_BAND].mean(axis=1), img[W.BOTTOM_BAND].mean(axis=1)])  # (rows, 3)


@lru_cache(maxsize=1)
def _band_templates() -> tuple[list[tuple[str, str]], np.ndarray]:
    keys = [(b, s) for b in W.BACKGROUNDS for s in W.STYLES]
    return keys, np.stack([_band_signature(W.render(W.Scene(b, s))) for b, s in keys])


@lru_cache(maxsize=None)
def _empty(bg: str, style: str) -> np.ndarray:
    return W.render(W.Scene(bg, style))


@lru_cache(maxsize=None)
def _with_square(bg: str, style: str, pos: str, colour: str) -> np.ndarray:
    return W.render(W.Scene(bg, style, {pos: W.Character("square", colour, "big")}))


def _box_mean(img: np.ndarray, pos: str) -> np.ndarray:
    rows, cols = _BOX
    return img[rows, cols[pos]].reshape(-1, 3).mean(axis=0)


@dataclass
class Reading:
    background: str
    style: str
    colours: dict[str, str]  # position -> colour name or "none"
    shapes: dict[str, str | None]  # position -> shape, where a colour was read
    sizes: dict[str, str | None]
    pure: dict[str, bool]  # position -> the colour read there is one of the world's, not a blend

    def character(self, pos: str) -> W.Character | None:
        """The character drawn at `pos`, or None where nothing is, or a blend of colours."""
        if self.colours[pos] == EMPTY or not self.pure[pos]:
            return None
        return W.Character(self.shapes[pos], self.colours[pos], self.sizes[pos])


def read(img) -> Reading:
    """What the image shows. `img`: (H, W, 3) or (3, H, W), uint8 or float in [0, 1]."""
    img = _as_float(img)
    keys, templates = _band_templates()
    d = ((templates - _band_signature(img)[None]) ** 2).mean(axis=(1, 2))
    bg, style = keys[int(np.argmin(d))]
    colours, shapes, sizes, pure = {}, {}, {}, {}
    for pos in W.POSITIONS:
        seen = _box_mean(img, pos)
        names = [EMPTY, *W.COLOURS]
        refs = [_box_mean(_empty(bg, style), pos)] + [_box_mean(_with_square(bg, style, pos, c), pos)
                                                      for c in W.COLOURS]
        dist = np.array([np.linalg.norm(seen - r) for r in refs])
        first, second = np.argsort(dist)[:2]
        best = names[int(first)]
        colours[pos], pure[pos] = best, bool(dist[first] <= PURE_RATIO * dist[second])
        shapes[pos], sizes[pos] = (None, None) if best == EMPTY else _shape_and_size(img, bg, style, pos, best)
    return Reading(bg, style, colours, shapes, sizes, pure)


def _shape_and_size(img: np.ndarray, bg: str, style: str, pos: str, colour: str) -> tuple[str, str]:
    cx, cy = W.POS_X[pos], W.CENTRE_Y
    win = (slice(cy - _WIN, cy + _WIN + 1), slice(max(cx - _WIN, 0), min(cx + _WIN + 1, W.SIZE)))
    patch = img[win]
    dist = {key: ((patch - _with_shape(bg, style, pos, colour, *key)[win]) ** 2).sum()
            for key in itertools.product(W.SHAPES, W.RADIUS)}
    return min(dist, key=dist.get)


@lru_cache(maxsize=None)
def _with_shape(bg: str, style: str, pos: str, colour: str, shape: str, size: str) -> np.ndarray:
    return W.render(W.Scene(bg, style, {pos: W.Character(shape, colour, size)}))


@dataclass
class Score:
    background: bool
    style: bool
    named_colours: int  # named characters whose colour was read at their position
    named: int  # named characters
    named_shapes: int
    named_sizes: int
    empty_ok: int  # positions the caption leaves empty that were read empty
    empty: int

    @property
    def conditioning(self) -> bool:
        """The issue's criterion: the background and every named character's colour at its position."""
        return self.background and self.named_colours == self.named

    @property
    def strict(self) -> bool:
        """Also every unnamed position empty, and the style right."""
        return self.conditioning and self.empty_ok == self.empty and self.style


def score(img, want: str | W.Scene) -> Score:
    """`want`: a caption in world.caption's form, or the scene itself."""
    if isinstance(want, str):
        want = W.parse_caption(want)
    got = read(img)
    named = [(p, c) for p, c in want.characters.items()]
    empty = [p for p in W.POSITIONS if p not in want.characters]
    return Score(
        background=got.background == want.background,
        style=got.style == want.style,
        named_colours=sum(got.colours[p] == c.colour for p, c in named),
        named=len(named),
        named_shapes=sum(got.colours[p] == c.colour and got.shapes[p] == c.shape for p, c in named),
        named_sizes=sum(got.colours[p] == c.colour and got.sizes[p] == c.size for p, c in named),
        empty_ok=sum(got.colours[p] == EMPTY for p in empty),
        empty=len(empty),
    )


def summarize(scores: list[Score]) -> dict[str, float]:
    """Rates over a set of scored images (each a fraction in [0, 1])."""
    n = max(len(scores), 1)
    named = max(sum(s.named for s in scores), 1)
    return {
        "images": len(scores),
        "conditioning": sum(s.conditioning for s in scores) / n,
        "strict": sum(s.strict for s in scores) / n,
        "background": sum(s.background for s in scores) / n,
        "style": sum(s.style for s in scores) / n,
        "colour_at_position": sum(s.named_colours for s in scores) / named,
        "shape_at_position": sum(s.named_shapes for s in scores) / named,
        "size_at_position": sum(s.named_sizes for s in scores) / named,
        "empty_positions": sum(s.empty_ok for s in scores) / max(sum(s.empty for s in scores), 1),
    }


# --- open attributes ----------------------------------------------------------------------------------------------

def open_values(drawn: W.Character | None, described: W.Character) -> tuple[str, ...] | None:
    """The values a drawing gives the attributes `described` leaves open; None when it drew no readable character
    or contradicts what the description states."""
    if drawn is None or any(getattr(drawn, a) != getattr(described, a) for a in W.ATTRIBUTES
                            if getattr(described, a) is not None):
        return None
    return tuple(getattr(drawn, a) for a in described.open)


def anchor_values(reading: Reading, described: W.Character) -> tuple[str, ...] | None:
    """An anchor (a render of the description alone, its place and background left to the model) read as the
    character: the first position, left to right, whose drawing matches the description."""
    return next((v for p in W.POSITIONS if (v := open_values(reading.character(p), described)) is not None), None)


def colour_at(reading: Reading, pos: str) -> str | None:
    """The pure colour drawn at `pos`, whatever its shape and size; None where nothing is, or a blend."""
    drawn = reading.character(pos)
    return drawn.colour if drawn else None


def anchor_colour(reading: Reading) -> str | None:
    """An anchor's colour alone: that of the first position, left to right, with a pure colour drawn, whatever its
    shape and size (the open colour apart from how well the model follows the stated attributes)."""
    return next((c for p in W.POSITIONS if (c := colour_at(reading, p)) is not None), None)


def agreement(appearances: list[tuple[str, ...] | None], anchor: tuple[str, ...] | None = None) -> dict:
    """One character's open-attribute agreement over its appearances (each its open_values; None: unreadable, which
    agrees with nothing): the share equal to its anchor's values, and to its most common values."""
    n = max(len(appearances), 1)
    counts = Counter(v for v in appearances if v is not None)
    common, times = counts.most_common(1)[0] if counts else (None, 0)
    return {"appearances": len(appearances), "anchor": list(anchor) if anchor else None,
            "most_common": list(common) if common else None,
            "with_anchor": sum(anchor is not None and v == anchor for v in appearances) / n,
            "with_most_common": times / n}
