"""The words the demo model knows: the toy world's vocabulary, the one source of it.

The toy world draws these (`bench/toy/world.py`: the demo model's training data and the judge's reference) and the
built-in planner of `make --llm demo` writes its plans in them (`data/demo_planner.py`); the two sit in sibling
layers, so the words live here, below both. No torch, no numpy: a list of words.

A scene is a background, up to one shape at each of three positions, and a style: "neon style, a big yellow square
on the left and a small white circle on the right, at night".
"""

from __future__ import annotations

SIZES = ("big", "small")
COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "centre", "right")
POSITION_PHRASES = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
BACKGROUNDS = ("sky", "grass", "night", "sunset", "sea")
BACKGROUND_PHRASES = {"sky": "in the sky", "grass": "on grass", "night": "at night", "sunset": "at sunset",
                      "sea": "by the sea"}
STYLES = ("plain", "pastel", "sepia", "neon", "striped")
