"""A procedural toy world: 64x64 scenes and their plain-English captions, deterministic from a seed.

A scene is a background, up to one shape at each of three fixed positions (left / centre / right), and a style that
transforms the whole image. Everything is drawn with numpy on the fly (nothing is stored), so the world is the
training set, the held-out set and the judge's reference at once.

The layout is deliberately rigid (fixed positions, fixed vertical centre, two sizes, bands above and below the shapes
that only the background touches): a model small enough to train on a laptop CPU can learn it, and the judge can
read it back without learned weights.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np

# The words live below the bench layer, where the demo planner (data) reads them too.
from movielm_fast.engine.demo_vocabulary import BACKGROUND_PHRASES, BACKGROUNDS, POSITIONS, SHAPES, STYLES
from movielm_fast.engine.demo_vocabulary import COLOURS as COLOUR_NAMES
from movielm_fast.engine.demo_vocabulary import POSITION_PHRASES as _POS_PHRASE

SIZE = 64
POS_X = {"left": 11, "centre": 32, "right": 53}
CENTRE_Y = 34
RADIUS = {"big": 9, "small": 5}
_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.98, 0.90, 0.10),
    "white": (0.98, 0.98, 0.98),
    "purple": (0.60, 0.10, 0.75),
}
COLOURS: dict[str, tuple[float, float, float]] = {name: _RGB[name] for name in COLOUR_NAMES}
# Rows that no shape ever touches (shapes span CENTRE_Y +- RADIUS["big"] + the neon glow): the judge reads the
# background and the style there.
TOP_BAND = slice(0, 20)
BOTTOM_BAND = slice(48, 64)


ATTRIBUTES = ("colour", "size", "shape")
OPEN_SHAPE = "shape"  # the noun of a description that leaves the shape open: "a big red shape"


@dataclass(frozen=True)
class Character:
    """A drawn character has every attribute; a description may leave any of them open (None): "a big circle"
    leaves the colour to the seed."""

    shape: str | None
    colour: str | None
    size: str | None = "big"

    @property
    def phrase(self) -> str:
        return "a " + " ".join(w for w in (self.size, self.colour, self.shape or OPEN_SHAPE) if w)

    @property
    def open(self) -> tuple[str, ...]:
        """The attributes this description leaves open."""
        return tuple(a for a in ATTRIBUTES if getattr(self, a) is None)


@dataclass(frozen=True)
class Scene:
    background: str
    style: str = "plain"
    characters: dict[str, Character] = field(default_factory=dict)  # position -> character

    def caption(self, with_style: bool = True, style_first: bool = False) -> str:
        return caption(self, with_style, style_first)


# --- drawing ------------------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _background(name: str) -> np.ndarray:
    t = (_YY / (SIZE - 1))[..., None]  # (H, W, 1) 0 at the top, 1 at the bottom
    if name == "sky":
        img = (1 - t) * np.array([0.35, 0.60, 0.95]) + t * np.array([0.75, 0.88, 1.00])
    elif name == "grass":
        img = np.where(t < 0.45, np.array([0.55, 0.78, 0.98]), np.array([0.30, 0.55, 0.20]))
    elif name == "night":
        img = np.broadcast_to(np.array([0.08, 0.08, 0.30]), (SIZE, SIZE, 3)).copy()
        stars = ((_XX * 7 + _YY * 13) % 41 == 0) & (_YY < 22)
        img[stars] = 0.95
    elif name == "sunset":
        img = (1 - t) * np.array([0.98, 0.55, 0.20]) + t * np.array([0.55, 0.20, 0.45])
    elif name == "sea":
        img = np.where(t < 0.40, np.array([0.65, 0.82, 0.98]), np.array([0.05, 0.30, 0.50]))
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.broadcast_to(img, (SIZE, SIZE, 3)).astype(np.float32)


def shape_mask(shape: str, position: str, size: str) -> np.ndarray:
    cx, cy, r = POS_X[position], CENTRE_Y, RADIUS[size]
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r + 0.5
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up; base at cy + r*0.8, apex at cy - r*1.0
        top, bottom = cy - r, cy + r * 0.8
        frac = (_YY - top) / (bottom - top)
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}")


_SEPIA = np.array([1.00, 0.78, 0.52], dtype=np.float32)
_LUMA = np.array([0.30, 0.59, 0.11], dtype=np.float32)


def style_colour_matrix(style: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with styled = colour @ A.T + b for the styles that are affine in colour (all but neon's glow)."""
    eye = np.eye(3, dtype=np.float32)
    if style in ("plain", "striped", "neon"):
        return eye, np.zeros(3, np.float32)
    if style == "pastel":
        return 0.45 * eye, np.full(3, 0.55, np.float32)
    if style == "sepia":
        return 0.45 * eye + 0.55 * np.outer(_SEPIA, _LUMA), np.zeros(3, np.float32)
    raise ValueError(f"unknown style {style!r}")


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) float32 in [0, 1]."""
    img = _background(scene.background).copy()
    masks = []
    for pos, ch in scene.characters.items():
        m = shape_mask(ch.shape, pos, ch.size)
        img[m] = COLOURS[ch.colour]
        masks.append((m, np.array(COLOURS[ch.colour], np.float32)))
    if scene.style == "neon":
        # Dark world, full-brightness shapes with a glowing rim of their own colour.
        shapes = np.zeros((SIZE, SIZE), bool)
        for m, _ in masks:
            shapes |= m
        out = img * 0.22
        for m, c in masks:
            ring = _dilate(m, 2) & ~shapes
            out[ring] = 0.65 * c + 0.1
        out[shapes] = img[shapes]
        img = out
    else:
        a, b = style_colour_matrix(scene.style)
        img = img @ a.T + b
        if scene.style == "striped":
            dark = ((_YY // 8) % 2 == 1)
            img = np.where(dark[..., None], img * 0.55, img)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --- captions -----------------------------------------------------------------------------------------------------

def caption(scene: Scene, with_style: bool = True, style_first: bool = False) -> str:
    """"a big red circle on the left and ..., on grass, sepia style". `style_first` puts the style where the
    engine's frame prompts put it ("sepia style, a big red circle ...")."""
    parts = [f"{ch.phrase} {_POS_PHRASE[p]}" for p in POSITIONS if (ch := scene.characters.get(p))]
    subject = " and ".join(parts) if parts else "an empty scene"
    text = f"{subject}, {BACKGROUND_PHRASES[scene.background]}"
    if with_style and style_first:
        return f"{scene.style} style, {text}"
    if with_style:
        text += f", {scene.style} style"
    return text


_CHAR_RE = re.compile(r"an? (?:(big|small) )?(?:(\w+) )?(\w+) (on the left|in the centre|on the right)")


def parse_caption(text: str) -> Scene:
    """The scene a caption names (the inverse of `caption`; open attributes are None). A caption without a style
    word is "plain"; text it does not understand raises ValueError."""
    text = text.strip().lower()
    bg = next((b for b, ph in BACKGROUND_PHRASES.items() if ph in text), None)
    if bg is None:
        raise ValueError(f"caption names no background: {text!r}")
    style = next((s for s in STYLES if f"{s} style" in text), "plain")
    chars: dict[str, Character] = {}
    for size, colour, shape, where in _CHAR_RE.findall(text):
        if (colour and colour not in COLOURS) or (shape not in SHAPES and shape != OPEN_SHAPE):
            raise ValueError(f"unknown colour or shape in {text!r}")
        pos = {v: k for k, v in _POS_PHRASE.items()}[where]
        chars[pos] = Character(None if shape == OPEN_SHAPE else shape, colour or None, size or None)
    return Scene(bg, style, chars)


# Other words for the same things, and other orders: the UNet trains on captions drawn from these (train.py
# --augment) so that a caption written by someone else still means its scene. The phrasing check
# (bench/toy_phrasing.py) holds out whole sentence forms -- attributes after the noun, background-first sentences
# with filler words, colons -- that `paraphrase` never produces; the words themselves are shared.
SIZE_WORDS = {"big": ("big", "large"), "small": ("small", "little")}
POS_WORDS = {"left": ("on the left", "at the left", "to the left"),
             "centre": ("in the centre", "in the center", "in the middle", "at the centre", "at the center"),
             "right": ("on the right", "at the right", "to the right")}
BACKGROUND_WORDS = {"sky": ("in the sky", "under the sky"), "grass": ("on grass", "on the grass", "on a lawn"),
                    "night": ("at night", "in the night", "at nighttime"),
                    "sunset": ("at sunset", "at dusk", "during sunset"),
                    "sea": ("by the sea", "at the sea", "by the ocean")}


def paraphrase(scene: Scene, rng: np.random.Generator, with_style: bool = True, style_first: bool = False) -> str:
    """A caption of `scene` in one of the training phrasings (synonyms, character order, where the position and the
    background go)."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    parts = []
    for p in POSITIONS:
        if (ch := scene.characters.get(p)) is None:
            continue
        words = (pick(SIZE_WORDS[ch.size]) if ch.size else None, ch.colour, ch.shape or OPEN_SHAPE)
        noun = " ".join(w for w in words if w)
        noun = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
        parts.append(f"{pick(POS_WORDS[p])} {noun}" if rng.random() < 0.3 else f"{noun} {pick(POS_WORDS[p])}")
    if rng.random() < 0.3:
        rng.shuffle(parts)
    subject = pick((" and ", ", ", ", and ")).join(parts) if parts else pick(("an empty scene", "nothing", "empty"))
    where = pick(BACKGROUND_WORDS[scene.background])
    text = f"{where}, {subject}" if rng.random() < 0.3 else f"{subject}, {where}"
    if with_style and style_first:
        return f"{scene.style} style, {text}"
    if with_style:
        text += f", {scene.style} style"
    return text


# --- sampling -----------------------------------------------------------------------------------------------------

def is_held_out(scene: Scene) -> bool:
    """One layout in ten (by a stable hash of background + characters, whatever the style) is never trained on,
    so the conditioning check measures composition, not memory."""
    key = caption(Scene(scene.background, "plain", scene.characters), with_style=False)
    return zlib.crc32(key.encode()) % 10 == 0


def random_scene(rng: np.random.Generator, styles: tuple[str, ...] = STYLES, held_out: bool | None = None) -> Scene:
    """A random scene; held_out=False draws only training layouts, True only held-out ones, None any."""
    while True:
        scene = _draw_scene(rng, styles)
        if held_out is None or is_held_out(scene) == held_out:
            return scene


def _draw_scene(rng: np.random.Generator, styles: tuple[str, ...]) -> Scene:
    n = rng.choice([0, 1, 1, 2, 2, 2]) if len(POSITIONS) >= 2 else 0
    where = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    chars = {POSITIONS[i]: Character(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))),
                                     str(rng.choice(["big", "small"]))) for i in where}
    return Scene(str(rng.choice(BACKGROUNDS)), str(rng.choice(styles)), chars)


def describe(scene: Scene, rng: np.random.Generator, p_open: float) -> Scene:
    """What a caption of `scene` may say: each character's colour, size and shape left open (None), each with
    probability `p_open`; the background, the style and every position always stated. The image stays the scene's,
    so an open attribute is learned as one the seed draws."""
    if p_open <= 0:
        return scene
    chars = {pos: Character(*(None if rng.random() < p_open else getattr(ch, a) for a in ("shape", "colour", "size")))
             for pos, ch in scene.characters.items()}
    return Scene(scene.background, scene.style, chars)


def scene_for_seed(seed: int, styles: tuple[str, ...] = STYLES, held_out: bool | None = None) -> Scene:
    return random_scene(np.random.default_rng(seed), styles, held_out)


def batch(rng: np.random.Generator, n: int, styles: tuple[str, ...] = STYLES, plain_caption_drop: float = 0.5,
          held_out: bool | None = False) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes: (n, 3, 64, 64) images in [-1, 1] (the VAE's range), captions, scenes. "plain style" is left out of
    a caption with probability `plain_caption_drop`, so a prompt without a style word means plain; the style comes
    first or last with equal probability (frame prompts put it first, plain English last)."""
    scenes = [random_scene(rng, styles, held_out) for _ in range(n)]
    imgs = np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2) * 2 - 1
    caps = [s.caption(with_style=not (s.style == "plain" and rng.random() < plain_caption_drop),
                      style_first=bool(rng.random() < 0.5)) for s in scenes]
    return imgs.astype(np.float32), caps, scenes

