"""The phrasing check's captions (bench.toy.phrasing) mean the scenes they are scored against, are phrased in forms
the toy model never trains on, and the bench builds its prompts as a render does. No rendering."""

import re

import numpy as np
import pytest

from movielm_fast.bench.toy import phrasing as P
from movielm_fast.bench.toy import ship
from movielm_fast.bench.toy import world as W

pytest.importorskip("torch")  # bench.toy_quality imports the renderer

from movielm_fast.bench import toy_quality as TQ  # noqa: E402

_BACKGROUND = {phrase.split()[-1]: bg for bg, phrases in W.BACKGROUND_WORDS.items() for phrase in phrases}
_SIZE = {w: size for size, words in W.SIZE_WORDS.items() for w in words}
_POSITION = {"left": "left", "right": "right", "centre": "centre", "center": "centre", "middle": "centre"}


def read_caption(text: str) -> W.Scene:
    """A reader written independently of the captions: the background word, and per clause (split at "and" and
    full stops) one colour, shape, size and position word."""
    words = re.findall(r"[a-z]+", text.lower())
    backgrounds = {_BACKGROUND[w] for w in words if w in _BACKGROUND}
    assert len(backgrounds) == 1, (text, backgrounds)
    chars = {}
    for clause in re.split(r" and |\. ", text.lower()):
        cw = re.findall(r"[a-z]+", clause)
        colours = [w for w in cw if w in W.COLOURS]
        if not colours:
            continue
        shapes, sizes = [w for w in cw if w in W.SHAPES], [_SIZE[w] for w in cw if w in _SIZE]
        places = [_POSITION[w] for w in cw if w in _POSITION]
        assert len(colours) == len(shapes) == len(sizes) == len(places) == 1, (clause, colours, shapes, sizes, places)
        assert places[0] not in chars, text
        chars[places[0]] = W.Character(shapes[0], colours[0], sizes[0])
    # Nothing the clauses missed: one colour and one shape word per character.
    assert sum(w in W.SHAPES for w in words) == sum(w in W.COLOURS for w in words) == len(chars), text
    return W.Scene(backgrounds.pop(), "plain", chars)


@pytest.mark.parametrize("caption,scene", P.HELD_OUT + P.ISSUE)
def test_caption_names_exactly_its_scene(caption, scene):
    assert read_caption(caption) == scene


def test_the_sets_are_what_the_docstring_says():
    assert len(P.HELD_OUT) >= 40 and len(P.ISSUE) == 8
    assert len({c for c, _ in P.HELD_OUT}) == len(P.HELD_OUT)
    issue = [sc for _, sc in P.ISSUE]
    assert sum(ch.colour == "blue" for sc in issue for ch in sc.characters.values()) == 2
    assert sum(ch.shape == "square" for sc in issue for ch in sc.characters.values()) == 3
    assert sum(sc.background == "night" for sc in issue) == 2
    # Every shape, colour, size, position and background is asked for somewhere in the held-out set.
    chars = [(p, ch) for _, sc in P.HELD_OUT for p, ch in sc.characters.items()]
    assert {ch.shape for _, ch in chars} == set(W.SHAPES) and {ch.colour for _, ch in chars} == set(W.COLOURS)
    assert {ch.size for _, ch in chars} == set(W.RADIUS) and {p for p, _ in chars} == set(W.POSITIONS)
    assert {sc.background for _, sc in P.HELD_OUT} == set(W.BACKGROUNDS)


def test_training_paraphrases_never_produce_a_held_out_caption():
    from movielm_fast.bench.toy.train import training_captions

    held = {c for c, _ in P.HELD_OUT}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        for _, sc in P.HELD_OUT:
            seen.add(W.paraphrase(sc, rng, with_style=False))
        # what train.py feeds the model: paraphrases and world captions, attributes left open
        seen.update(training_captions(rng, [sc for _, sc in P.HELD_OUT], augment=0.6, p_open=0.3))
    assert len(seen) > 500  # the paraphraser does vary
    assert not seen & held
    # Nor the sentence forms' marks: colons, parentheses, "there is", "background", "coloured", "side".
    marks = re.compile(r"[:()]|there is|background|coloured|side\b")
    assert not any(marks.search(c) for c in seen)
    assert sum(bool(marks.search(c)) for c in held) >= len(held) // 2


def test_shipped_vocabulary_covers_every_training_paraphrase():
    keep = set(ship.toy_vocabulary())
    tok = ship.clip_tokenizer()
    rng = np.random.default_rng(1)
    for _ in range(300):
        sc = W.describe(W.random_scene(rng), rng, 0.3)
        text = W.paraphrase(sc, rng, style_first=bool(rng.random() < 0.5))
        missing = set(tok(text).input_ids) - keep
        assert not missing, (text, tok.convert_ids_to_tokens(sorted(missing)))


def test_bench_prompts_are_the_engines():
    assert TQ.engine_prompts(["a big blue square in the centre, at night"], "plain") == [
        "plain style, a big blue square in the centre, at night"]
    scenes = [W.scene_for_seed(TQ.HELD_OUT_SEED + i, held_out=True) for i in range(30)]
    prompts = TQ.scene_prompts(scenes)
    assert all(p.startswith(f"{sc.style} style, ") for p, sc in zip(prompts, scenes))
    assert [W.parse_caption(p) for p in prompts] == scenes  # the style-first form still means its scene


def test_report_shows_the_phrasing_rates():
    rates = {"images": 90, "conditioning": 0.5, "background": 0.9, "colour_at_position": 0.75,
             "shape_at_position": 0.25, "size_at_position": 0.6, "empty_positions": 1.0}
    res = {"settings": {"model": "demo", "model_hash": "h", "size": 64, "steps": 20, "scheduler": "dpmpp",
                        "guidance": 4.0}, "machine": {"cpu_model": "cpu"}, "created": "now",
           "phrasing": {"held_out": {"rates": rates}}}
    text = "\n".join(TQ.toy_quality_section([res]))
    assert "| held-out forms | 90 | 50% | 90% | 75% | 25% | 60% | 100% |" in text


def test_report_keeps_the_shipped_model_first_and_joins_consistency_runs():
    """The section is the shipped demo's; a fine-tune measured after it gets a part of its own, where consistency
    settings measured in separate runs share one table."""
    def res(model, created, **parts):
        return {"settings": {"model": model, "model_hash": model[-2:], "size": 64, "steps": 20, "scheduler": "dpmpp",
                             "guidance": 4.0}, "machine": {"cpu_model": "cpu"}, "created": created, **parts}

    rates = {k: 1.0 for k in ("conditioning", "strict", "background", "style", "colour_at_position",
                              "shape_at_position", "size_at_position", "empty_positions")}
    row = {"movie_seeds": 3, "appearances": 48, "with_anchor": 0.5, "with_most_common": 0.75, "anchors_read": 1.0,
           "leak": 0.25, "seconds": 1.0}
    text = "\n".join(TQ.toy_quality_section([
        res("demo", "1", conditioning={"rates": {**rates, "images": 100}, "judge_on_ground_truth": rates}),
        res("/x/f1", "2", consistency={"none": {**row, "consistency": {"mode": "none"}}}),
        res("/x/f1", "3", consistency={"tok": {**row, "with_anchor": 0.875, "anchor_prompt": "{appearance} on grass",
                                               "read_alone": 1.0, "read_together": 0.5, "anchor_steps": 40,
                                               "colour_with_anchor": 0.9,
                                               "consistency": {"mode": "character_token", "token_steps": 75}}})]))
    shipped, fine_tune = text.split("### Not shipped: /x/f1 (hash f1)")
    assert "Model demo (hash mo)" in shipped and "**Consistency**" not in shipped
    # A run from before results recorded their anchor prompt and steps: its anchors were at night, at the frames'.
    assert "| none (none) | in the centre, at night; 20 steps | 48 | 50% | 75% | 100% | — |" in fine_tune
    assert ('| tok (character_token, "token_steps": 75) | on grass; 40 steps | 48 | 88% | 75% | 100% | 100% / 50% | '
            '90% |' in fine_tune)
    assert "| none (none) | in the centre, at night; 20 steps | 48 | 50% | 75% | 100% | — | — |" in fine_tune


def test_story_plan_leaves_the_colour_open_unless_stated():
    """The consistency story's characters leave their colour open; its "words" reference states a colour each."""
    from dataclasses import replace

    from movielm_fast.engine.jobs import BatchSettings

    s = BatchSettings(64, 64, 4, 1.0, "dpmpp")
    plan = TQ.story_plan({"mode": "none"}, s, 0)
    assert [c["appearance"] for c in plan["characters"]] == ["a big circle", "a small square"]
    stated = TQ.story_plan({"mode": "none"}, s, 0, {**TQ.CAST, "Tom": replace(TQ.CAST["Tom"], colour="red")})
    assert [c["appearance"] for c in stated["characters"]] == ["a big circle", "a small red square"]
    assert stated["frames"] == plan["frames"]  # the same frames: their seeds and noise are the same
