"""Captions of the toy world written by hand, in sentence forms the toy model never trains on, with the scenes they
mean: the phrasing check of bench.toy_quality renders them as a plan's frames (style "plain", so the engine's prompt
is "plain style, <caption>") and the judge reads each attribute back.

The words are the world's and their synonyms in world.SIZE_WORDS / POS_WORDS / BACKGROUND_WORDS (the toy text
encoder, trained from scratch, knows no others); the sentence forms are not world.caption's or world.paraphrase's:
attributes after the noun, bare background words, "X scene with", colons, "there is", parentheses, "side",
labelled lists. tests/test_toy_phrasing.py checks that every caption names exactly its scene and that the training
paraphrases never produce one of them.

ISSUE holds eight captions in the spirit of the issue's report ("a big blue square in the centre, at night" and the
like: blue twice, squares three times, night twice), which today's model got wrong.
"""

from __future__ import annotations

from . import world as W


def _scene(background: str, **where: str) -> W.Scene:
    """`_scene("night", centre="big blue square")`."""
    chars = {}
    for pos, words in where.items():
        size, colour, shape = words.split()
        chars[pos] = W.Character(shape, colour, size)
    return W.Scene(background, "plain", chars)


HELD_OUT: list[tuple[str, W.Scene]] = [
    # attributes after the noun, a bare background word
    ("a blue square, big, in the middle, night", _scene("night", centre="big blue square")),
    ("a red triangle, small, on the left, sunset", _scene("sunset", left="small red triangle")),
    ("a yellow circle, large, on the right, sea", _scene("sea", right="big yellow circle")),
    ("a green square, little, in the center, sky", _scene("sky", centre="small green square")),
    ("a white triangle, big, on the right, grass", _scene("grass", right="big white triangle")),
    ("a purple circle, small, on the left, night", _scene("night", left="small purple circle")),
    # "<background> scene with ..."
    ("night scene with a large blue square at the centre", _scene("night", centre="big blue square")),
    ("sunset scene with a big green triangle on the right", _scene("sunset", right="big green triangle")),
    ("sea scene with a small white square on the left", _scene("sea", left="small white square")),
    ("sky scene with a large red circle in the middle", _scene("sky", centre="big red circle")),
    ("grass scene with a little yellow triangle on the left and a big blue circle on the right",
     _scene("grass", left="small yellow triangle", right="big blue circle")),
    # a background phrase and a colon first
    ("at sunset: a small red triangle on the left", _scene("sunset", left="small red triangle")),
    ("at night: a big white square on the right", _scene("night", right="big white square")),
    ("by the sea: a large purple triangle in the middle", _scene("sea", centre="big purple triangle")),
    ("in the sky: a little blue circle on the left and a big yellow square in the center",
     _scene("sky", left="small blue circle", centre="big yellow square")),
    ("on the grass: a big red square at the centre", _scene("grass", centre="big red square")),
    # "there is ...", "side"
    ("there is a big green circle on the right side, on the grass", _scene("grass", right="big green circle")),
    ("there is a small blue triangle on the left side, at night", _scene("night", left="small blue triangle")),
    ("there is a large yellow square in the middle, at dusk", _scene("sunset", centre="big yellow square")),
    ("there is a little purple square on the right side, by the ocean", _scene("sea", right="small purple square")),
    ("there is a big white circle on the left side and a small red square on the right side, in the sky",
     _scene("sky", left="big white circle", right="small red square")),
    # no article, "background"
    ("night background, large red circle in the centre", _scene("night", centre="big red circle")),
    ("sea background, small green triangle on the right", _scene("sea", right="small green triangle")),
    ("sunset background, big blue square on the left", _scene("sunset", left="big blue square")),
    ("grass background, little white circle in the middle", _scene("grass", centre="small white circle")),
    ("sky background, big purple triangle on the right", _scene("sky", right="big purple triangle")),
    # sizes in parentheses
    ("two shapes by the sea: a red circle (small) on the left and a white triangle (big) on the right",
     _scene("sea", left="small red circle", right="big white triangle")),
    ("two shapes at night: a yellow square (big) on the left and a green circle (small) in the middle",
     _scene("night", left="big yellow square", centre="small green circle")),
    ("two shapes on the grass: a blue triangle (small) in the center and a purple square (big) on the right",
     _scene("grass", centre="small blue triangle", right="big purple square")),
    ("one shape at sunset: a white square (small) on the right", _scene("sunset", right="small white square")),
    ("one shape in the sky: a green triangle (big) on the left", _scene("sky", left="big green triangle")),
    # labelled lists
    ("left: big red square. right: small blue circle. background: grass.",
     _scene("grass", left="big red square", right="small blue circle")),
    ("centre: large white triangle. background: night.", _scene("night", centre="big white triangle")),
    ("right: little yellow triangle. background: sea.", _scene("sea", right="small yellow triangle")),
    ("left: small purple circle. centre: big green square. background: sunset.",
     _scene("sunset", left="small purple circle", centre="big green square")),
    ("middle: big blue circle. background: sky.", _scene("sky", centre="big blue circle")),
    # the shape first, its colour after
    ("a big square, coloured red, on the right, at night", _scene("night", right="big red square")),
    ("a small circle, coloured yellow, on the left, by the sea", _scene("sea", left="small yellow circle")),
    ("a large triangle, coloured blue, in the middle, at sunset", _scene("sunset", centre="big blue triangle")),
    ("a little square, coloured green, on the left side, in the sky", _scene("sky", left="small green square")),
    ("a big circle, coloured purple, at the center, on the grass", _scene("grass", centre="big purple circle")),
    # nothing drawn
    ("an empty night scene, nothing in it", _scene("night")),
    ("just the sea, no shapes", _scene("sea")),
    ("only grass, empty", _scene("grass")),
    ("a sunset with nothing in front of it", _scene("sunset")),
]

ISSUE: list[tuple[str, W.Scene]] = [
    ("a big blue square in the centre, at night", _scene("night", centre="big blue square")),
    ("a small blue circle on the left, on grass", _scene("grass", left="small blue circle")),
    ("a big red square on the right, at sunset", _scene("sunset", right="big red square")),
    ("a small yellow square in the centre, in the sky", _scene("sky", centre="small yellow square")),
    ("a big white triangle on the left and a big green circle on the right, at night",
     _scene("night", left="big white triangle", right="big green circle")),
    ("a big purple triangle in the centre, by the sea", _scene("sea", centre="big purple triangle")),
    ("a small red triangle on the left, on grass", _scene("grass", left="small red triangle")),
    ("a big green circle on the right, by the sea", _scene("sea", right="big green circle")),
]
