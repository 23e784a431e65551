"""Data safety and untrusted input (issue 27): each numbered case of the issue, reproduced as written."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from movielm_fast.cli.export_cmds import export_cmd
from movielm_fast.cli.llm_cmds import dataset_cmd
from movielm_fast.cli.main import cli
from movielm_fast.data.dataset import DatasetOptions, export_dataset
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.frames import OVERFLOW
from movielm_fast.errors import PlanError, UserError
from movielm_fast.export import cache
from movielm_fast.paths import cache_root
from movielm_fast.plan import RenderSettings, load_plan
from movielm_fast.run import storyboard as storyboard_mod
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor, reason
from movielm_fast.run.outputs import anchor_file
from movielm_fast.run.renderer import Renderer
from movielm_fast.run.storyboard import cells, storyboard
from tests.helpers import movie, write_plan

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5, "seed": 4}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def null_renderer():
    return Renderer(ModelConfig(model="demo", backend="null"))


@pytest.fixture(scope="module")
def demo_renderer():
    return Renderer(ModelConfig(model="demo"))


def _render(renderer, out, plan, **cfg):
    return render(RunConfig(out=out, style_training=False, **cfg), [plan], executor=LocalExecutor(renderer=renderer))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. an empty MOVIELM_CACHE / HOME, and --clear ----------------------------------------------------------------

def test_empty_cache_variable_never_makes_the_working_directory_the_cache(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "artifacts" / "thesis").mkdir(parents=True)
    (work / "artifacts" / "thesis" / "chapter1.tex").write_text("years of work")
    (work / "artifacts" / "notes.cache").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOVIELM_CACHE", "")
    assert cache_root() == tmp_path / "home" / ".cache" / "movielm-fast"
    res = CliRunner().invoke(export_cmd, ["--clear"])
    assert res.exit_code == 0, res.output
    assert (work / "artifacts" / "thesis" / "chapter1.tex").read_text() == "years of work"
    assert (work / "artifacts" / "notes.cache").read_text() == "mine"
    # Both empty: the account's home from the password database, never the working directory or /.cache.
    monkeypatch.setenv("HOME", "")
    root = cache_root()
    assert root.is_absolute() and not root.is_relative_to(work) and root != Path("/.cache/movielm-fast")


def test_clear_removes_only_entries_its_own_manifests_say_it_made(tmp_path, monkeypatch):
    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path / "cache"))
    root = cache.artifacts_root()
    ours = root / "demo-abc" / "unet.ort-cpu.fp32.dynamic.123"
    ours.mkdir(parents=True)
    (ours / "model.onnx").write_bytes(b"x")
    (ours / cache.MANIFEST).write_text(json.dumps({"format": cache.MANIFEST_FORMAT, "model_hash": "abc"}))
    theirs = root / "demo-abc" / "photos"  # a folder of someone else's beside ours
    theirs.mkdir()
    (theirs / "cat.jpg").write_bytes(b"meow")
    (root / "user-folder").mkdir()
    (root / "user-folder" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    (root / "trt-timing-h100-sm90.cache").write_bytes(b"t")
    (root / "precious.cache").write_bytes(b"p")
    res = CliRunner().invoke(export_cmd, ["--clear"])
    assert res.exit_code == 0 and "removed 1 artifact(s)" in res.output
    assert not ours.exists() and (theirs / "cat.jpg").read_bytes() == b"meow"
    assert (root / "user-folder" / "manifest.json").exists() and (root / "precious.cache").exists()
    assert not (root / "trt-timing-h100-sm90.cache").exists()


# --- 2. a movie id shared by two plans ---------------------------------------------------------------------------

def test_a_different_movie_under_an_id_already_in_out_is_refused(tmp_path, null_renderer):
    out = tmp_path / "out"
    first = write_plan(tmp_path / "first.json", [movie("duchess", 2, title="The Duchess")], SMALL)
    _render(null_renderer, out, first)
    before = _tree(out)
    second = write_plan(tmp_path / "second.json", [movie("duchess", 1, title="A Different Story")], SMALL)
    with pytest.raises(UserError) as err:
        _render(null_renderer, out, second)
    assert "another movie" in err.value.message and "The Duchess" in err.value.message
    assert "--replace" in err.value.hint and "--out" in err.value.hint
    assert _tree(out) == before  # nothing of the first is touched
    # The same plan with other render settings is the same movie: it re-renders as before.
    again = _render(null_renderer, out, first, overrides=RenderSettings(steps=3))
    assert again.frames_rendered == 2
    # --replace renders the other movie over it.
    res = CliRunner().invoke(cli, ["render", str(second), "--backend", "null", "--out", str(out), "--replace",
                                   "--json", "--no-style-training"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "duchess" / "manifest.json").read_text())
    assert manifest["movie"]["title"] == "A Different Story" and [f["id"] for f in manifest["frames"]] == ["000"]


def test_old_manifests_without_an_identity_are_adopted(tmp_path, null_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("old", 2)], SMALL)
    _render(null_renderer, out, plan)
    path = out / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("identity", "plan"):  # as written before identities existed
        manifest.pop(key)
    path.write_text(json.dumps(manifest))
    resumed = _render(null_renderer, out, plan)
    assert resumed.frames_rendered == 0 and resumed.frames_skipped == 2
    assert json.loads(path.read_text())["identity"]


# --- 3. and 8. dataset: paths, hashes, one bad movie --------------------------------------------------------------

@pytest.fixture
def rendered(tmp_path, null_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("good", 2), movie("bad", 2)], SMALL)
    _render(null_renderer, out, plan)
    return out


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_dataset_refuses_paths_outside_out_and_exports_the_others(rendered):
    def escape(m):
        m["frames"][0]["file"] = "../../../../../../../../etc/passwd"

    _edit_manifest(rendered / "bad" / "manifest.json", escape)
    report = export_dataset(rendered, DatasetOptions("llava"))
    assert "outside the movie's folder" in report.skipped["bad"] and report.movies == 1
    text = (rendered / "dataset.json").read_text()
    assert "passwd" not in text and "good/frames/000.png" in text


def test_dataset_checks_frames_against_their_hashes(rendered):
    (rendered / "bad" / "frames" / "001.png").write_bytes(b"")  # a zero-byte frame
    res = CliRunner().invoke(dataset_cmd, [str(rendered), "--video"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # exit 1, no traceback
    assert "skipped movie bad" in res.output and "sha256" in res.output
    records = json.loads((rendered / "dataset.json").read_text())
    assert {r["video"] for r in records} == {"good/movie.mp4"}
    assert not (rendered / "bad" / "movie.mp4").exists()


def test_a_media_token_in_one_movie_is_reported_by_field_and_the_rest_exported(rendered):
    def token(m):
        m["movie"]["frames"][1]["dialogue"] = "Insert <video> here"

    _edit_manifest(rendered / "bad" / "manifest.json", token)
    report = export_dataset(rendered, DatasetOptions("jsonl"))
    assert "frames[1].dialogue" in report.skipped["bad"] and "<video>" in report.skipped["bad"]
    assert report.movies == 1 and report.records > 0


# --- 4. the umask ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_files_honour_the_umask(tmp_path, null_renderer, mask):
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        _render(null_renderer, out, write_plan(tmp_path / "plan.json", [movie("u", 2)], SMALL))
        export_dataset(out, DatasetOptions("llava"))
    finally:
        os.umask(old)
    files = [out / "u" / "frames" / "000.png", out / "u" / "manifest.json", out / "u" / "storyboard.png",
             out / "dataset.json"]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~mask for f in files}


# --- 5. orphan temporary files --------------------------------------------------------------------------------

def test_stale_orphan_temporaries_are_cleaned_on_the_next_run(tmp_path, null_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("t", 2)], SMALL)
    _render(null_renderer, out, plan)
    frames = out / "t" / "frames"
    orphan = frames / ".001.png.k3j_x9a2.tmp"  # as kill -9 leaves one
    orphan.write_bytes(b"\0" * 1000)
    hour_ago = time.time() - 3600
    os.utime(orphan, (hour_ago, hour_ago))
    in_flight = frames / ".000.png.abcdefgh.tmp"  # a concurrent render's, being written now
    in_flight.write_bytes(b"\0")
    mine = frames / ".notes.tmp"  # not a name of ours
    mine.write_bytes(b"x")
    os.utime(mine, (hour_ago, hour_ago))
    _render(null_renderer, out, plan)
    assert not orphan.exists() and in_flight.exists() and mine.exists()


# --- 6. a re-render with changed settings, and damaged frames -------------------------------------------------

def test_rerender_with_changed_settings_rebuilds_the_storyboard(tmp_path, demo_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("s", 6)], {**SMALL, "steps": 1})
    _render(demo_renderer, out, plan)
    first = (out / "s" / "storyboard.png").read_bytes()
    changed = _render(demo_renderer, out, plan, overrides=RenderSettings(steps=2))
    assert changed.frames_rendered == 6
    folder = out / "s"
    lm = load_plan(plan)[0]
    expected = storyboard([(c, folder / f"frames/{c[0]}.png") for c in cells(lm.movie)], title=lm.movie.title)
    assert (folder / "storyboard.png").read_bytes() == expected != first


def test_truncated_frames_are_rerendered_not_a_crash(tmp_path, demo_renderer):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("tr", 12)], SMALL)
    _render(demo_renderer, out, plan, batch_size=4)
    for i in range(11):
        path = out / "tr" / "frames" / f"{i:03d}.png"
        path.write_bytes(path.read_bytes()[:300])
    again = _render(demo_renderer, out, plan, batch_size=4)
    assert again.frames_rendered == 11 and again.frames_skipped == 1
    folder = out / "tr"
    lm = load_plan(plan)[0]
    expected = storyboard([(c, folder / f"frames/{c[0]}.png") for c in cells(lm.movie)], title=lm.movie.title)
    assert (folder / "storyboard.png").read_bytes() == expected  # made of the re-rendered frames, not the cut ones


# --- 7. a mistyped manifest or journal ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["frames-null", "frames-list", "id-list", "journal"])
def test_a_mistyped_manifest_is_kept_aside_and_rebuilt_from_the_frames(tmp_path, null_renderer, damage, caplog):
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("d", 3)], SMALL)
    _render(null_renderer, out, plan)
    path = out / "d" / "manifest.json"
    data = json.loads(path.read_text())
    if damage == "frames-null":
        data["frames"] = None
    elif damage == "frames-list":
        data["frames"] = [["000", "frames/000.png"]]
    elif damage == "id-list":
        data["frames"][0]["id"] = ["x"]
    else:
        path.with_name("manifest.journal.jsonl").write_text('{"id": {}}\n')
    path.write_text(json.dumps(data))
    damaged = path.read_bytes()
    again = _render(null_renderer, out, plan)
    assert again.frames_rendered == 0 and again.frames_skipped == 3  # the frame files said what they are
    assert path.with_name("manifest.json.damaged").read_bytes() == damaged
    assert len(json.loads(path.read_text())["frames"]) == 3
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == 1
    assert _render(null_renderer, out, plan).frames_skipped == 3  # and it is whole again


# --- 9. long character names ------------------------------------------------------------------------------------

def test_file_names_from_long_character_names_are_bounded_and_distinct():
    taken: set[str] = set()
    a, b = anchor_file("Rosamund " * 60 + "the elder", taken), anchor_file("Rosamund " * 60 + "the younger", taken)
    assert a != b and all(len(Path(n).name.encode()) <= 80 for n in (a, b))
    assert anchor_file("Rosa", taken) == "anchors/Rosa.png"  # short names keep the name they always had


def test_a_long_character_name_renders_in_consistency_mode(tmp_path, demo_renderer):
    m = movie("long", 2)
    name = "Lady Rosamund " * 30 + "of Hawthorne"
    m["characters"] = [{"name": name, "appearance": "a woman in lavender"}]
    m["frames"] = [{"id": f"{i:03d}", "description": f"{{{name}}} in scene {i}"} for i in range(2)]
    m["consistency"] = {"mode": "anchor_attention"}
    out = tmp_path / "out"
    summary = _render(demo_renderer, out, write_plan(tmp_path / "plan.json", [m], SMALL))
    assert summary.frames_rendered == 2 and not summary.failures
    assert len(list((out / "long" / "anchors").glob("*.png"))) == 1


# --- 10. an overflow's message fits the run ---------------------------------------------------------------------

def test_an_emphasis_overflow_says_what_overflowed_not_use_fp32(tmp_path, demo_renderer):
    m = movie("emph", 1)
    m["frames"][0]["description"] = f"(Rosa:{'1' + '0' * 39}) in the ballroom"  # a weight of 1e39
    summary = _render(demo_renderer, tmp_path / "out", write_plan(tmp_path / "plan.json", [m], SMALL))
    why = summary.failures[0]["reason"]
    assert "emphasis" in why and "--dtype fp32" not in why
    assert "--dtype fp32" not in reason(FloatingPointError(OVERFLOW), "fp32")
    assert "--dtype fp32" in reason(FloatingPointError(OVERFLOW), "fp16")


# --- 11. storyboards of long movies -----------------------------------------------------------------------------

def test_a_long_movie_gets_storyboard_pages_with_an_index(tmp_path, null_renderer, monkeypatch):
    monkeypatch.setattr(storyboard_mod, "FRAMES_PER_PAGE", 8)  # stands for 256: the same code path, fewer frames
    out = tmp_path / "out"
    plan = write_plan(tmp_path / "plan.json", [movie("epic", 10)], SMALL)
    summary = _render(null_renderer, out, plan)
    folder = out / "epic"
    index = json.loads((folder / "storyboard.json").read_text())
    assert [p["file"] for p in index["pages"]] == ["storyboard-001.png", "storyboard-002.png"]
    assert [(p["first"], p["last"], p["frames"]) for p in index["pages"]] == [("000", "007", 8), ("008", "009", 2)]
    assert summary.storyboards == [str(folder / "storyboard.json")] and not (folder / "storyboard.png").exists()
    heights = []
    for page in index["pages"]:
        with Image.open(folder / page["file"]) as im:
            heights.append(im.height)
    assert heights[1] < heights[0]  # two rows of 4, then one: each page bounded by its frames, not the movie's
    # The movie shrinks to one page: storyboard.png again, and the pages go.
    write_plan(plan, [movie("epic", 3)], SMALL)
    _render(null_renderer, out, plan)
    assert (folder / "storyboard.png").exists() and not list(folder.glob("storyboard-*.png"))
    assert not (folder / "storyboard.json").exists()


# --- 12. input that exhausts the machine --------------------------------------------------------------------------

def test_plans_that_are_not_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)  # reading it would block forever
    for path in (fifo, Path("/dev/zero")):
        res = CliRunner().invoke(cli, ["render", str(path), "--out", str(tmp_path / "out")])
        assert res.exit_code == 2 and "not a regular file" in res.output, res.output


def test_plan_size_nesting_and_text_are_bounded_with_overrides(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 1500 + "]" * 1500)
    for cmd in (["render", str(deep), "--out", str(tmp_path / "out")],
                ["qa", str(deep), "--source", "derived", "--out", str(tmp_path / "qa.json")]):
        res = CliRunner().invoke(cli, cmd)
        assert res.exit_code == 2 and "nested more than" in res.output, res.output
    nested = tmp_path / "nested.json"
    camera: object = "x"
    for _ in range(32):  # a movie's fields sit 5 levels down: this is 37
        camera = [camera]
    nested.write_text(json.dumps({"movies": [{"id": "x", "style": {"name": "G"},
                                              "frames": [{"id": "1", "description": "d", "camera": camera}]}]}))
    with pytest.raises(PlanError, match="nested more than 32"):
        load_plan(nested)
    long = write_plan(tmp_path / "long.json", [movie("l", 1)])
    data = json.loads(long.read_text())
    data["movies"][0]["frames"][0]["description"] = "Rosa " * 5000  # 25,000 characters
    long.write_text(json.dumps(data))
    with pytest.raises(PlanError) as err:
        load_plan(long)
    assert err.value.problems[0][0] == "$.movies[0].frames[0].description"
    assert "MOVIELM_MAX_TEXT_CHARS" in err.value.problems[0][1]
    monkeypatch.setenv("MOVIELM_MAX_TEXT_CHARS", "30000")
    assert load_plan(long)[0].movie.frames[0].description.startswith("Rosa")
    monkeypatch.setenv("MOVIELM_MAX_PLAN_BYTES", "1000")
    with pytest.raises(PlanError, match="MOVIELM_MAX_PLAN_BYTES"):
        load_plan(long)


def test_prompts_are_bounded_in_windows(tmp_path, null_renderer, monkeypatch):
    monkeypatch.setenv("MOVIELM_MAX_PROMPT_WINDOWS", "1")
    m = movie("wordy", 1)
    m["frames"][0]["description"] = "Rosa walks through the long gallery " * 20
    summary = _render(null_renderer, tmp_path / "out", write_plan(tmp_path / "plan.json", [m, movie("short", 1)],
                                                                  SMALL))
    assert summary.frames_rendered == 1 and summary.failures[0]["movie"] == "wordy"
    assert "windows" in summary.failures[0]["reason"] and "MOVIELM_MAX_PROMPT_WINDOWS" in summary.failures[0]["reason"]


# --- 13. tracebacks become errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under-file", "read-only"])
def test_an_unusable_cache_folder_is_a_clean_error(tmp_path, monkeypatch, where):
    (tmp_path / "f").write_text("x")
    cache_dir = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "cache", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache_dir.mkdir()
        cache_dir.chmod(0o555)
    monkeypatch.setenv("MOVIELM_CACHE", str(cache_dir))
    plan = write_plan(tmp_path / "plan.json", [movie("c", 1)], SMALL)
    res = CliRunner().invoke(cli, ["render", str(plan), "--out", str(tmp_path / "out"), "--no-style-training"])
    assert res.exit_code == 2 and "MOVIELM_CACHE" in res.output, res.output


def test_a_folder_where_a_frame_goes_is_a_clean_error(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("dir", 1)], SMALL)
    (tmp_path / "out" / "dir" / "frames" / "000.png").mkdir(parents=True)
    res = CliRunner().invoke(cli, ["render", str(plan), "--backend", "null", "--out", str(tmp_path / "out"),
                                   "--no-style-training"])
    assert res.exit_code == 2 and "000.png" in res.output and "move or delete" in res.output, res.output


def test_a_non_utf8_caption_file_is_a_clean_error(tmp_path):
    from movielm_fast.style.images import load_images

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(UserError, match="caption file"):
        load_images(tmp_path, 64)


def test_eval_refuses_a_pickled_checkpoint_cleanly(tmp_path):
    from transformers import CLIPConfig

    clip = tmp_path / "clip"
    clip.mkdir()
    CLIPConfig().to_json_file(clip / "config.json")
    torch.save({"x": torch.zeros(1)}, clip / "pytorch_model.bin")  # a pickle
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "out"), "--clip", str(clip)])
    assert res.exit_code == 2 and "safetensors" in res.output, res.output
