"""Questions derived from a plan without an LLM: every answer must follow from the plan's order and cast."""

from __future__ import annotations

import json

from click.testing import CliRunner

from movielm_fast.cli.llm_cmds import qa_cmd
from movielm_fast.data.llm.qa import QA_KINDS, derived_qa, movie_record
from movielm_fast.plan import parse_plan

SCENES = [
    "Anna opens the bakery at dawn.",
    "Ben delivers flour to the bakery.",
    "Anna and Ben argue about the price.",
    "A storm floods the street outside.",
    "{Ben} carries Anna's cakes to safety.",
    "Anna and Ben share a cake by candlelight.",
]
PLAN = {
    "id": "bakery", "title": "The Bakery", "overview": "Two rivals fall in love in a flooded town.",
    "style": {"name": "Pastel", "description": "((soft pastel)), morning light"},
    "characters": [{"name": "Anna", "appearance": "a baker with red curls."},
                   {"name": "Ben", "appearance": "a tall miller in a flour-dusted apron"},
                   {"name": "Cora", "appearance": "an old neighbour"}],
    "frames": [{"id": f"{i:03d}", "description": d} for i, d in enumerate(SCENES, 1)],
}
PLAIN = [s.replace("{Ben}", "Ben").rstrip(".") for s in SCENES]


def movie():
    return parse_plan(json.loads(json.dumps(PLAN)))[0].movie


def answers(pairs, question_start):
    return [p for p in pairs if p["question"].startswith(question_start)]


def test_right_after_answers_are_the_next_scene():
    pairs = answers(derived_qa(movie(), limit=10)["temporal_qa"], "What happens right after")
    assert len(pairs) == len(SCENES) - 1
    for p in pairs:
        i = next(i for i, s in enumerate(PLAIN) if f'"{s}"' in p["question"])
        assert p["answer"] == PLAIN[i + 1] + "."


def test_which_comes_first_names_the_earlier_scene():
    pairs = answers(derived_qa(movie(), limit=10)["temporal_qa"], "Which comes first")
    assert pairs
    offered_first = set()
    for p in pairs:
        a, b = p["question"].split('"')[1], p["question"].split('"')[3]
        earlier = min(a, b, key=PLAIN.index)
        assert p["answer"].startswith(f'"{earlier}" comes first')
        offered_first.add(a == earlier)
    assert offered_first == {True, False}, "the right answer must not always be the first option"


def test_beginning_end_and_overview():
    qa = derived_qa(movie())
    by_q = {p["question"]: p["answer"] for p in qa["temporal_qa"]}
    assert by_q["How does the movie begin?"] == SCENES[0]
    assert by_q["How does the movie end?"] == SCENES[-1]
    assert qa["overview_qa"] == [{"question": "What is this movie about?", "answer": PLAN["overview"]}]


def test_character_questions():
    by_q = {p["question"]: p["answer"] for p in derived_qa(movie())["character_qa"]}
    assert by_q["Who are the main characters?"] == "The main characters are Anna, Ben and Cora."
    assert by_q["What does Anna look like?"] == "Anna is a baker with red curls."
    assert by_q["When does Ben first appear?"] == f"In scene 2 of 6: {PLAIN[1]}."
    # "Anna's" counts as Anna appearing; "{Ben}" counts as Ben.
    assert by_q["In how many scenes does Anna appear?"] == "Anna appears in 4 of the 6 scenes."
    assert by_q["In how many scenes does Ben appear?"] == "Ben appears in 4 of the 6 scenes."
    assert "When does Cora first appear?" not in by_q, "no question about a scene that does not exist"


def test_limit_spreads_questions_over_the_whole_movie():
    pairs = answers(derived_qa(movie(), limit=2)["temporal_qa"], "What happens right after")
    assert [p["answer"] for p in pairs] == [PLAIN[1] + ".", PLAIN[-1] + "."]


def test_deterministic_and_in_movielm_format():
    first, second = movie_record(movie(), derived_qa(movie())), movie_record(movie(), derived_qa(movie()))
    assert first == second
    assert first["movie_title"] == "The Bakery" and first["movie_id"] == "bakery"
    assert list(first["QA"]) == list(QA_KINDS)
    assert all(set(p) == {"question", "answer"} for k in QA_KINDS for p in first["QA"][k])


def test_qa_command_derived_needs_no_llm(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    plan, out = tmp_path / "plan.json", tmp_path / "qa.json"
    plan.write_text(json.dumps(PLAN))
    result = CliRunner().invoke(qa_cmd, [str(plan), "--source", "derived", "--out", str(out)])
    assert result.exit_code == 0, result.output
    [record] = json.loads(out.read_text())
    assert record["QA"] == movie_record(movie(), derived_qa(movie()))["QA"]


def test_qa_command_reads_a_folder_of_plans_as_render_does(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    plans, out = tmp_path / "plans", tmp_path / "qa.json"
    plans.mkdir()
    for movie_id in ("b-movie", "a-movie"):
        (plans / f"{movie_id}.json").write_text(json.dumps({**PLAN, "id": movie_id}))
    result = CliRunner().invoke(qa_cmd, [str(plans), "--source", "derived", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["movie_id"] for r in json.loads(out.read_text())] == ["a-movie", "b-movie"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(qa_cmd, [str(empty), "--source", "derived", "--out", str(out)])
    assert result.exit_code != 0 and "no plan files found" in str(result.exception or result.output)


# --- speakers and shots (optional plan fields) ------------------------------------------------------------------

SHOTS_PLAN = {
    **PLAN,
    "frames": [
        {"id": "001", "description": SCENES[0], "shot": "wide", "dialogue": "Fresh bread!", "speaker": "Anna"},
        {"id": "002", "description": SCENES[1], "shot": "medium", "dialogue": "Flour, as promised.",
         "speaker": "Ben"},
        {"id": "003", "description": SCENES[2], "shot": "close-up", "dialogue": "Too expensive!", "speaker": "Anna"},
        {"id": "004", "description": SCENES[3], "dialogue": "Too expensive!", "speaker": "Ben"},
        {"id": "005", "description": SCENES[4], "shot": "over-the-shoulder", "dialogue": "Nobody speaks here?"},
        {"id": "006", "description": SCENES[5], "shot": "extreme close-up"},
    ],
}


def shots_movie():
    return parse_plan(json.loads(json.dumps(SHOTS_PLAN)))[0].movie


def test_who_says_questions_name_the_speaker():
    by_q = {p["question"]: p["answer"] for p in derived_qa(shots_movie(), limit=10)["character_qa"]}
    assert by_q['Who says "Fresh bread!"?'] == "Anna."
    assert by_q['Who says "Flour, as promised."?'] == "Ben."
    # Said by both Anna and Ben: no single right answer, so no question; a line without a speaker neither.
    assert not [q for q in by_q if "Too expensive" in q or "Nobody speaks" in q]


def test_shot_order_questions_follow_the_plan():
    temporal = derived_qa(shots_movie(), limit=10)["temporal_qa"]
    by_q = {p["question"]: p["answer"] for p in temporal}
    assert by_q["How is the opening scene framed?"] == "As a wide shot."
    assert by_q["In what order are the first 3 scenes framed?"] == \
        "A wide shot, then a medium shot, then a close-up shot."
    after = [p for p in temporal if "How is the scene right after it framed?" in p["question"]]
    # Only consecutive frames that both have a shot: 001->002, 002->003, 005->006.
    assert [p["answer"].split(":")[0] for p in after] == ["As a medium shot", "As a close-up shot",
                                                          "As an extreme close-up shot"]
    assert after[-1]["question"].startswith(f'The scene "{PLAIN[4]}" is an over-the-shoulder shot.')
    assert after[-1]["answer"] == f"As an extreme close-up shot: {PLAIN[5]}."


def test_plans_without_shots_or_speakers_get_no_such_questions():
    qa = derived_qa(movie(), limit=10)
    assert not [p for k in qa for p in qa[k] if "framed" in p["question"] or p["question"].startswith("Who says")]
