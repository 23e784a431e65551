"""Dataset export from a hand-made render output folder: records, QA sources, and mp4s that decode back."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from click.testing import CliRunner
from PIL import Image

from movielm_fast.cli.llm_cmds import dataset_cmd
from movielm_fast.data.dataset import MANIFEST_FORMAT, DatasetOptions, export_dataset, validate_record, write_video
from movielm_fast.data.llm.qa import derived_qa
from movielm_fast.errors import UserError
from movielm_fast.paths import sha256_file
from movielm_fast.plan import parse_plan

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def movie_json(movie_id, frames):
    return {"id": movie_id, "title": movie_id.title(), "overview": f"All about {movie_id}.",
            "style": {"name": "Flat", "description": "((flat colour))"},
            "characters": [{"name": "Ada", "appearance": "a woman in a green coat"}],
            "frames": [{"id": f"{i:03d}", "description": f"Ada stands in room {i}.", "dialogue": ""}
                       for i in range(1, frames + 1)]}


def render_movie(out: Path, movie_id: str, frames: int, size=(64, 48)) -> dict:
    """Write what `render` writes: frames, manifest and storyboard."""
    movie = movie_json(movie_id, frames)
    folder = out / movie_id
    (folder / "frames").mkdir(parents=True)
    entries = []
    for i, frame in enumerate(movie["frames"]):
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(folder / "frames" / f"{frame['id']}.png")
        entries.append({"id": frame["id"], "file": f"frames/{frame['id']}.png", "prompt": frame["description"],
                        "negative_prompt": "", "seed": i, "seconds": 0.1,
                        "sha256": sha256_file(folder / "frames" / f"{frame['id']}.png")})
    Image.new("RGB", size).save(folder / "storyboard.png")
    manifest = {"format": MANIFEST_FORMAT, "movie": movie, "model": {"id": "tiny", "hash": "abc"},
                "settings": {"width": size[0], "height": size[1]}, "frames": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return movie


@pytest.fixture
def out(tmp_path):
    render_movie(tmp_path / "out", "alpha", 3)
    render_movie(tmp_path / "out", "beta", 4)
    return tmp_path / "out"


def derived_count(movie):
    qa = derived_qa(parse_plan(movie)[0].movie)
    return sum(len(v) for v in qa.values())


def test_llava_records_with_frames(out):
    report = export_dataset(out, DatasetOptions("llava"))
    records = json.loads((out / "dataset.json").read_text())
    assert report.records == len(records) == derived_count(movie_json("alpha", 3)) + derived_count(
        movie_json("beta", 4))
    assert all(validate_record(r, out) == [] for r in records)
    alpha = [r for r in records if r["id"].startswith("alpha-")]
    assert alpha[0]["frames"] == ["alpha/frames/001.png", "alpha/frames/002.png", "alpha/frames/003.png"]
    human, gpt = alpha[0]["conversations"]
    assert human == {"from": "human", "value": "<video>\nWhat is this movie about?"}
    assert gpt == {"from": "gpt", "value": "All about alpha."}
    assert len({r["id"] for r in records}) == len(records)


def test_jsonl_with_qa_file_and_video(out, tmp_path):
    qa = [{"movie_id": "alpha", "movie_title": "Alpha",
           "QA": {"overview_qa": [{"question": "Q0?", "answer": "A0."}],
                  "plot_qa": [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2."}],
                  "temporal_qa": [{"question": "Q3?", "answer": "A3."}]}}]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    dest = tmp_path / "data" / "train.jsonl"
    result = CliRunner().invoke(dataset_cmd, [str(out), "--format", "jsonl", "--qa", str(tmp_path / "qa.json"),
                                              "--video", "--seconds-per-frame", "1.5", "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    assert "no QA for beta" in result.stderr
    records = [json.loads(line) for line in dest.read_text().splitlines()]
    alpha = [r for r in records if r["id"].startswith("alpha-")]
    assert [r["id"] for r in alpha] == ["alpha-overview-01", "alpha-plot-01", "alpha-plot-02", "alpha-temporal-01"]
    assert alpha[1]["video"] == "../out/alpha/movie.mp4"
    assert alpha[1]["conversations"][1]["value"] == "A1."
    assert all(validate_record(r, dest.parent) == [] for r in records)
    with av.open(str(out / "beta" / "movie.mp4")) as container:
        frames = list(container.decode(video=0))
        assert len(frames) == 4
        assert abs(frames[1].time - frames[0].time - 1.5) < 1e-6
    # Keyframes come back in order: the second one is green.
    r, g, b = frames[1].to_image().getpixel((32, 24))
    assert g > 200 and r < 60 and b < 60


def test_fps_repeats_keyframes(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (33, 21), COLOURS[i]).save(files[-1])
    count = write_video(files, tmp_path / "v.mp4", seconds_per_frame=0.5, fps=4)
    with av.open(str(tmp_path / "v.mp4")) as container:
        decoded = list(container.decode(video=0))
    assert count == len(decoded) == 6
    assert (decoded[0].width, decoded[0].height) == (32, 20)


def test_incomplete_render_is_reported_and_the_others_exported(out):
    (out / "beta" / "frames" / "002.png").unlink()
    report = export_dataset(out, DatasetOptions("llava"))
    assert list(report.skipped) == ["beta"] and "incompletely rendered" in report.skipped["beta"]
    assert report.movies == 1
    assert {r["id"].split("-")[0] for r in json.loads((out / "dataset.json").read_text())} == {"alpha"}
    (out / "alpha" / "frames" / "001.png").unlink()  # no movie left to export: an error
    with pytest.raises(UserError, match="incompletely rendered"):
        export_dataset(out, DatasetOptions("llava"))


def test_not_a_render_folder(tmp_path):
    with pytest.raises(UserError, match="no rendered movies"):
        export_dataset(tmp_path, DatasetOptions("llava"))


def test_validate_record_catches_format_mistakes():
    good = {"id": "x", "frames": ["a.png"], "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                               {"from": "gpt", "value": "A."}]}
    assert validate_record(good) == []
    assert validate_record({**good, "video": "v.mp4"}) == ["exactly one of 'video' or 'frames' is required"]
    no_token = {**good, "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    assert any("<video>" in p for p in validate_record(no_token))
    swapped = {**good, "conversations": good["conversations"][::-1]}
    assert len(validate_record(swapped)) >= 2
    assert validate_record(good, Path("/nonexistent")) == ["media file missing: a.png"]


def test_render_still_in_progress_is_a_user_error(out):
    manifest_path = out / "alpha" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["frames"] = manifest["frames"][:2]
    manifest_path.write_text(json.dumps(manifest))
    report = export_dataset(out, DatasetOptions("jsonl"))
    assert "2 of 3 frames rendered" in report.skipped["alpha"] and report.movies == 1
    with pytest.raises(UserError, match="2 of 3 frames rendered"):
        export_dataset(out, DatasetOptions("jsonl", movies=["alpha"]))


def test_records_keep_each_line_with_its_speaker(tmp_path):
    out = tmp_path / "out"
    movie = render_movie(out, "gamma", 3)
    movie["characters"].append({"name": "Bo", "appearance": "a boy with a kite"})
    movie["frames"][0].update(dialogue="Look up!", speaker="Ada", shot="wide")
    movie["frames"][2].update(dialogue="It flies.")  # a line nobody is credited with
    manifest_path = out / "gamma" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["movie"] = movie
    manifest_path.write_text(json.dumps(manifest))
    export_dataset(out, DatasetOptions("jsonl"))
    records = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    assert records and all(r["dialogue"] == [{"frame": "001", "speaker": "Ada", "text": "Look up!"},
                                             {"frame": "003", "speaker": "", "text": "It flies."}] for r in records)
    asked = {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in records}
    assert asked['<video>\nWho says "Look up!"?'] == "Ada."
    assert asked["<video>\nHow is the opening scene framed?"] == "As a wide shot."
    assert all(validate_record(r, out) == [] for r in records)


def test_movies_without_dialogue_carry_no_dialogue_key(out):
    export_dataset(out, DatasetOptions("llava"))
    assert not [r for r in json.loads((out / "dataset.json").read_text()) if "dialogue" in r]


def test_unwritable_dest_is_a_user_error(out, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create"):
        export_dataset(out, DatasetOptions("llava", dest=tmp_path / "file" / "sub" / "d.json"))
