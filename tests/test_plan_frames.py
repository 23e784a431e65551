"""Optional per-frame plan fields: shot (a fixed vocabulary), camera (free text), speaker (a character)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from movielm_fast.errors import PlanError
from movielm_fast.plan import SHOTS, load_plan, normalise_shot, parse_plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def movie(*frames, characters=("Rosamund", "Thomas")):
    return {"id": "m", "style": {"name": "Gothic"},
            "characters": [{"name": n, "appearance": f"{n} in grey"} for n in characters],
            "frames": [{"id": f"{i:03d}", "description": "A room.", **f} for i, f in enumerate(frames, 1)]}


def problems(data):
    with pytest.raises(PlanError) as info:
        parse_plan(data)
    return info.value.problems


def test_every_example_plan_stays_valid():
    paths = sorted(EXAMPLES.rglob("*.json"))
    assert paths
    for path in paths:
        for loaded in load_plan(path):
            assert all(f.shot is None and f.camera == "" and f.speaker == "" for f in loaded.movie.frames)


def test_shot_camera_speaker_are_accepted():
    [loaded] = parse_plan(movie({"shot": "over-the-shoulder", "camera": "low angle, 85mm", "dialogue": "Hush.",
                                 "speaker": "Thomas"}, {"shot": "point of view"}, {}))
    first, second, third = loaded.movie.frames
    assert (first.shot, first.camera, first.speaker) == ("over-the-shoulder", "low angle, 85mm", "Thomas")
    assert second.shot == "point of view" and third.shot is None


@pytest.mark.parametrize("written, canonical", [
    ("Close-Up", "close-up"), ("close_up", "close-up"), ("close up shot", "close-up"),
    ("EXTREME  CLOSE-UP", "extreme close-up"), ("over_the_shoulder", "over-the-shoulder"),
    ("point-of-view", "point of view"), ("Wide shot", "wide"), ("insert", "insert"), ("", None)])
def test_shot_case_and_separators_are_normalised(written, canonical):
    assert normalise_shot(written) == canonical


def test_every_shot_in_the_vocabulary_is_its_own_canonical_name():
    assert [normalise_shot(s) for s in SHOTS] == list(SHOTS)


def test_unknown_shot_lists_the_vocabulary():
    [(path, message)] = problems(movie({"shot": "dutch angle"}))
    assert path == "$.frames[0].shot"
    assert message == ("unknown shot 'dutch angle': use one of extreme wide, wide, medium, close-up, extreme "
                       "close-up, over-the-shoulder, point of view, insert (or leave it out)")
    [(path, _)] = problems({"movies": [movie({}, {"shot": "pov"})]})
    assert path == "$.movies[0].frames[1].shot"


def test_speaker_must_be_a_character():
    [(path, message)] = problems(movie({"dialogue": "Hi.", "speaker": "Rosamond"}))
    assert path == "$.frames[0].speaker"
    assert message == "unknown character 'Rosamond' as speaker: did you mean 'Rosamund'?"
    [(_, message)] = problems(movie({"dialogue": "Hi.", "speaker": "Zed"}))
    assert message == "unknown character 'Zed' as speaker: add it to 'characters' or leave speaker empty"


def test_speaker_needs_dialogue():
    [(path, message)] = problems(movie({"speaker": "Thomas"}))
    assert path == "$.frames[0].speaker"
    assert message == ("speaker 'Thomas' is set but 'dialogue' is empty: add the line to 'dialogue', or remove "
                       "'speaker'")
    # Empty speaker with or without dialogue is fine: a line nobody is credited with, or silence.
    parse_plan(movie({"dialogue": "Who goes there?", "speaker": ""}, {"speaker": ""}))


def test_character_references_in_camera_must_exist():
    [(path, message)] = problems(movie({"camera": "over {Tomas}'s shoulder"}))
    assert path == "$.frames[0].camera" and message == "unknown character {Tomas}: did you mean 'Thomas'?"


def test_misspelt_frame_key_suggests_the_field():
    [(path, message)] = problems(movie({"speeker": "Thomas"}))
    assert path == "$.frames[0].speeker" and message == "unknown key 'speeker': did you mean 'speaker'?"


def test_stored_manifests_round_trip():
    [loaded] = parse_plan(movie({"shot": "wide", "dialogue": "Hi.", "speaker": "Thomas"}))
    dumped = json.loads(json.dumps(loaded.movie.model_dump(mode="json")))
    assert parse_plan(dumped)[0].movie == loaded.movie


def test_shown_names_characters_a_frame_refers_to_otherwise():
    """ "she", "the detective": the plan says who by `shown` (and by `speaker`); consistency mode gives the frame
    their tokens, appended where the description does not name them. Without the mode the prompt is unchanged."""
    from movielm_fast.run.prompts import frame_characters, frame_prompt

    [loaded] = parse_plan(movie({"description": "Rosamund waits. The detective enters.", "shown": ["Thomas"]},
                                {"description": "She turns away.", "dialogue": "Go.", "speaker": "Rosamund"},
                                {"description": "An empty hall."}))
    m = loaded.movie
    assert [frame_characters(m, f) for f in m.frames] == [["Rosamund", "Thomas"], ["Rosamund"], []]
    tokens = {"Rosamund": "<rosamund-1>", "Thomas": "<thomas-2>"}
    assert frame_prompt(m, m.frames[0], None, tokens) == \
        "Gothic style, <rosamund-1> Rosamund in grey waits. The detective enters., <thomas-2> Thomas in grey"
    assert frame_prompt(m, m.frames[1], None, tokens) == "Gothic style, She turns away., <rosamund-1> Rosamund in grey"
    assert frame_prompt(m, m.frames[2], None, tokens) == frame_prompt(m, m.frames[2]) == "Gothic style, An empty hall."
    assert frame_prompt(m, m.frames[1]) == "Gothic style, She turns away."
    [(path, message)] = problems(movie({"shown": ["Tomas"]}))
    assert path == "$.frames[0].shown[0]" and message == "unknown character 'Tomas': did you mean 'Thomas'?"
