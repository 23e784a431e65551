"""The write stage: pipelined writes equal sequential ones, image formats and their metadata, the manifest journal,
the null backend."""

from __future__ import annotations

import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.images import read_frame_metadata
from movielm_fast.run.manifest import read_manifest
from movielm_fast.run.renderer import Renderer
from tests.helpers import load_png, movie, write_plan

SMALL = {"width": 64, "height": 64, "steps": 2, "guidance": 7.5, "seed": 4}


@pytest.fixture(scope="module")
def null_renderer():
    return Renderer(ModelConfig(model="demo", backend="null"))


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _without_seconds(manifest: bytes) -> dict:
    data = json.loads(manifest)
    for f in data["frames"]:
        f.pop("seconds")
    return data


def test_pipelined_writer_gives_the_same_files_as_the_sequential_one(tmp_path):
    renderer = Renderer(ModelConfig(model="demo"))  # real pixels: every frame differs
    plan = write_plan(tmp_path / "plan.json", [movie("a", 7), movie("b", 3)], SMALL)
    outs = {}
    for threads in (0, 2):
        out = tmp_path / f"t{threads}"
        cfg = RunConfig(out=out, batch_size=3, writer_threads=threads, style_training=False)
        summary = render(cfg, [plan], executor=LocalExecutor(renderer=renderer))
        assert summary.frames_rendered == 10 and summary.write["frames"] == 10
        outs[threads] = _files(out)
    seq, pipe = outs[0], outs[2]
    assert seq.keys() == pipe.keys()
    assert not [k for k in seq if k.endswith(".tmp") or "journal" in k]  # journals are folded in at the end
    for name in seq:
        if name.endswith("manifest.json"):
            assert _without_seconds(seq[name]) == _without_seconds(pipe[name])
        else:  # frames and storyboards: the same bytes
            assert seq[name] == pipe[name], name


@pytest.mark.parametrize("fmt,quality", [("jpg", None), ("webp", 80)])
def test_lossy_formats_keep_metadata_and_are_recorded(tmp_path, null_renderer, fmt, quality):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 2)], SMALL)
    out = tmp_path / "out"
    cfg = RunConfig(out=out, image_format=fmt, quality=quality, style_training=False)
    render(cfg, [plan], executor=LocalExecutor(renderer=null_renderer))
    manifest = json.loads((out / "m" / "manifest.json").read_text())
    assert manifest["settings"]["image_format"] == fmt
    assert manifest["settings"]["quality"] == (quality or 95)
    entry = manifest["frames"][0]
    assert entry["file"] == f"frames/000.{fmt}" and entry["image_format"] == fmt
    meta = read_frame_metadata(out / "m" / entry["file"])
    assert meta["prompt"] == entry["prompt"] and int(meta["seed"]) == entry["seed"]
    assert json.loads(meta["settings"])["steps"] == 2
    with Image.open(out / "m" / entry["file"]) as im:
        assert im.format == {"jpg": "JPEG", "webp": "WEBP"}[fmt] and im.size == (64, 64)
    # Another format is another output: the frames are made again, not taken for done.
    again = render(RunConfig(out=out, style_training=False), [plan],
                   executor=LocalExecutor(renderer=null_renderer))
    assert again.frames_rendered == 2
    assert json.loads((out / "m" / "manifest.json").read_text())["frames"][0]["file"] == "frames/000.png"


def test_journal_entries_count_until_the_manifest_is_rewritten(tmp_path, null_renderer):
    plan = write_plan(tmp_path / "plan.json", [movie("j", 3)], SMALL)
    out = tmp_path / "out"
    render(RunConfig(out=out, style_training=False), [plan], executor=LocalExecutor(renderer=null_renderer))
    manifest_path = out / "j" / "manifest.json"
    full = json.loads(manifest_path.read_text())
    # As a killed run leaves it: manifest.json with one frame, the other two in the journal, the last line cut.
    journal = manifest_path.with_name("manifest.journal.jsonl")
    first, *rest = full["frames"]
    manifest_path.write_text(json.dumps({**full, "frames": [first]}))
    journal.write_text("".join(json.dumps(e) + "\n" for e in rest) + '{"id": "00')
    merged = read_manifest(manifest_path)
    assert [f["id"] for f in merged["frames"]] == ["000", "001", "002"]
    resumed = render(RunConfig(out=out, style_training=False), [plan],
                     executor=LocalExecutor(renderer=null_renderer))
    assert resumed.frames_rendered == 0 and resumed.frames_skipped == 3
    assert not journal.exists() and len(json.loads(manifest_path.read_text())["frames"]) == 3


def test_null_backend_runs_the_whole_engine_from_the_cli(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("n", 3)], {**SMALL, "width": 128, "height": 96})
    res = CliRunner().invoke(cli, ["render", str(plan), "--backend", "null", "--out", str(tmp_path / "out"),
                                   "--image-format", "jpg", "--quality", "90", "--json", "--no-style-training"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["rendered"] == 3 and summary["write"]["frames"] == 3
    a = load_png(tmp_path / "out" / "n" / "frames" / "000.jpg")
    b = load_png(tmp_path / "out" / "n" / "frames" / "001.jpg")
    assert a.shape == (96, 128, 3) and a.std() > 40  # detailed, noise-like: encoders work as on a real frame
    assert np.array_equal(a, b)  # one fixed image: the same for every frame
    assert (tmp_path / "out" / "n" / "storyboard.png").is_file()


def _sheet_oracle(frames, columns=4, thumb=256, title=""):
    """The contact sheet composed as one Pillow image (how storyboards were made before they were encoded in
    bands): the pixels a band-encoded storyboard.png must decode to. frames: (cell, thumbnail)."""
    from PIL import ImageDraw

    from movielm_fast.run.storyboard import CAPTION_H, TITLE_H, _font, cell_lines
    cols = min(columns, len(frames))
    rows = -(-len(frames) // cols)
    cell_w, cell_h = thumb + 16, thumb + CAPTION_H + 16
    top = TITLE_H if title else 0
    sheet = Image.new("RGB", (cols * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 10), title, fill="black", font=_font(18))
    for i, (cell, im) in enumerate(frames):
        x, y = (i % cols) * cell_w + 8, top + (i // cols) * cell_h + 8
        sheet.paste(im, (x + (thumb - im.width) // 2, y))
        for k, line in enumerate(cell_lines(cell)):
            draw.text((x, y + thumb + 4 + 18 * k), line, fill="black", font=_font(14))
    return np.asarray(sheet)


def test_storyboard_is_encoded_band_by_band_to_the_same_file_in_any_order(tmp_path):
    from movielm_fast.run.storyboard import Storyboard, read_thumbnail, thumbnail
    rng = np.random.default_rng(3)
    ids = [f"{i:03d}" for i in range(10)]
    dialogue = {fid: ("" if i % 3 == 0 else f"Line {i}, which is long enough to wrap onto a second line or more.")
                for i, fid in enumerate(ids)}
    # Noise and flat frames, 512² (reduced) and 64² (enlarged), so every filter byte and size case is exercised.
    images = {fid: Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8) if i % 2 else
                                   np.full((64, 64, 3), (i * 20, 200, 90), np.uint8)) for i, fid in enumerate(ids)}
    thumbs = {fid: thumbnail(im) for fid, im in images.items()}
    for fid in ids[:3]:  # frames of an earlier run: read back from their files
        images[fid].save(tmp_path / f"{fid}.png")
    frames = [(fid, f"Rosa in scene {fid}, which is described at some length", dialogue[fid]) for fid in ids]
    TITLE = "The Duchess and the Commoner"

    def sheet_from(order, threads=1):
        sheet = Storyboard(frames, lambda fid: read_thumbnail(tmp_path / f"{fid}.png"), pending=ids[3:],
                           title=TITLE)
        if threads == 1:
            for fid in order:
                sheet.add(fid, thumbs[fid])
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda fid: sheet.add(fid, thumbs[fid]), order))
        return sheet

    in_order = Storyboard(frames, lambda fid: read_thumbnail(tmp_path / f"{fid}.png"), pending=ids[3:], title=TITLE)
    for fid in ids[3:8]:
        in_order.add(fid, thumbs[fid])
    assert in_order.band == 2 and len(in_order.thumbs) == 0  # rows 1 and 2 encoded already, thumbnails let go
    for fid in ids[8:]:
        in_order.add(fid, thumbs[fid])
    data = in_order.png()
    assert sheet_from(ids[:2:-1]).png() == data  # reversed: nothing is encoded before the last frame
    assert sheet_from(ids[3:], threads=4).png() == data
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        decoded = np.asarray(im.convert("RGB"))
    assert np.array_equal(decoded, _sheet_oracle([(cell, thumbs[cell[0]]) for cell in frames], title=TITLE))


def test_resumed_run_writes_the_storyboard_of_an_uninterrupted_one(tmp_path):
    """Frames of the earlier run are read back from their files into the sheet, this run's come from its pixels:
    the same file either way."""
    renderer = Renderer(ModelConfig(model="demo"))
    plan = write_plan(tmp_path / "plan.json", [movie("s", 7)], SMALL)

    def run(out, progress=None):
        cfg = RunConfig(out=out, batch_size=3, writer_threads=2, style_training=False)
        return render(cfg, [plan], progress, executor=LocalExecutor(renderer=renderer))

    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt

    run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", interrupt)
    assert not (tmp_path / "resumed" / "s" / "storyboard.png").exists()
    assert run(tmp_path / "resumed").frames_skipped == 3
    sheet = (tmp_path / "whole" / "s" / "storyboard.png").read_bytes()
    assert (tmp_path / "resumed" / "s" / "storyboard.png").read_bytes() == sheet


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"quality": 90})])
def test_frames_encoded_through_an_in_memory_file_are_pillows_bytes(fmt, kw):
    from movielm_fast.run.images import _saved
    img = Image.fromarray((np.random.default_rng(1).random((96, 128, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    assert _saved(img, format=fmt, **kw) == buf.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_writer_threads_run_below_the_render_thread():
    import os

    from movielm_fast.run.writer import WRITER_NICENESS, Writer
    writer = Writer({}, None, encoding=("png", None), threads=2)
    try:
        nice = writer.pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
    finally:
        writer.close()
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice == min(19, mine + WRITER_NICENESS) and mine == os.getpriority(os.PRIO_PROCESS, 0)


def test_storyboard_cells_show_description_speaker_and_line():
    from movielm_fast.plan import parse_plan
    from movielm_fast.run.storyboard import cell_lines, cells

    m = movie("c", 2)
    m["frames"][0].update(speaker="Rosa")
    [lm] = parse_plan(m)
    first, second = cells(lm.movie)
    assert cell_lines(first) == ["#000 Rosa in scene 0", "Rosa: \u201cline 0\u201d"]
    assert cell_lines(second) == ["#001 Rosa in scene 1", "\u201cline 1\u201d"]
    long = cell_lines(("007", "word " * 40, "Rosa: " + "talk " * 60))
    assert len(long) == 4 and long[1].endswith("\u2026") and long[-1].endswith("\u2026")
