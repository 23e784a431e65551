"""End-to-end rendering: outputs, batch invariance, resume, OOM back-off and clean errors."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from movielm_fast import paths as paths_mod
from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.manifest import read_manifest
from movielm_fast.run.renderer import Renderer
from tests.helpers import load_png, movie, write_plan

SMALL = {"width": 64, "height": 64, "steps": 3, "guidance": 7.5, "seed": 11}


@pytest.fixture(scope="module")
def demo_renderer():
    return Renderer(ModelConfig(model="demo"))


def _config(out, **kw):
    return RunConfig(out=out, style_training=False, **kw)


def test_outputs_match_design(tmp_path, demo_renderer):
    plan = write_plan(tmp_path / "plan.json", [movie("duchess", 3)], SMALL)
    summary = render(_config(tmp_path / "out", batch_size=2), [plan], executor=LocalExecutor(renderer=demo_renderer))
    assert summary.frames_rendered == 3 and summary.frames_skipped == 0
    mdir = tmp_path / "out" / "duchess"
    manifest = json.loads((mdir / "manifest.json").read_text())
    assert manifest["model"]["id"] == "demo" and len(manifest["model"]["hash"]) == 16
    assert [f["id"] for f in manifest["frames"]] == ["000", "001", "002"]
    for entry in manifest["frames"]:
        png = mdir / entry["file"]
        assert paths_mod.sha256_file(png) == entry["sha256"]
        assert entry["prompt"].startswith("Gothic style, soft sepia, a woman in lavender in scene")
        with Image.open(png) as im:
            assert im.size == (64, 64)
            assert im.text["prompt"] == entry["prompt"] and im.text["seed"] == str(entry["seed"])
            assert im.text["model"] == "demo"
    with Image.open(mdir / "storyboard.png") as sb:
        assert sb.width >= 3 * 64
    assert not list(mdir.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_batch_invariance(tmp_path, demo_renderer):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 4)], SMALL)
    render(_config(tmp_path / "b1", batch_size=1), [plan], executor=LocalExecutor(renderer=demo_renderer))
    render(_config(tmp_path / "b4", batch_size=4), [plan], executor=LocalExecutor(renderer=demo_renderer))
    for i in range(4):
        a = load_png(tmp_path / "b1" / "m" / "frames" / f"{i:03d}.png")
        b = load_png(tmp_path / "b4" / "m" / "frames" / f"{i:03d}.png")
        assert np.abs(a - b).max() <= 2
    # Different frames really differ (seeds are per frame).
    f0 = load_png(tmp_path / "b1" / "m" / "frames" / "000.png")
    f1 = load_png(tmp_path / "b1" / "m" / "frames" / "001.png")
    assert np.abs(f0 - f1).mean() > 5


def test_seed_modes_and_explicit_seed(tmp_path, demo_renderer):
    m = movie("s", 2)
    m["frames"][1]["seed"] = 77
    m["render"] = {"seed_mode": "shared"}
    plan = write_plan(tmp_path / "plan.json", [m], SMALL)
    render(_config(tmp_path / "out"), [plan], executor=LocalExecutor(renderer=demo_renderer))
    frames = json.loads((tmp_path / "out" / "s" / "manifest.json").read_text())["frames"]
    assert [f["seed"] for f in frames] == [11, 77]


def test_seeds_carry_the_movie_and_stay_javascript_safe(tmp_path, demo_renderer):
    # Two movies with the same movie seed and frame ids (issue 33): their frames get different noise.
    plan = write_plan(tmp_path / "plan.json", [movie("a", 2), movie("b", 2)], SMALL)
    render(_config(tmp_path / "out"), [plan], executor=LocalExecutor(renderer=demo_renderer))
    manifests = {m: json.loads((tmp_path / "out" / m / "manifest.json").read_text()) for m in "ab"}
    seeds = {m: [f["seed"] for f in manifests[m]["frames"]] for m in "ab"}
    assert set(seeds["a"]).isdisjoint(seeds["b"]) and len(set(seeds["a"])) == 2
    assert all(0 <= s < 2**53 for m in "ab" for s in seeds[m])  # JavaScript's safe integers
    assert all(manifests[m]["settings"]["seed_scheme"] == 2 for m in "ab")
    a0 = load_png(tmp_path / "out" / "a" / "frames" / "000.png")
    b0 = load_png(tmp_path / "out" / "b" / "frames" / "000.png")
    assert np.abs(a0 - b0).mean() > 5
    with Image.open(tmp_path / "out" / "a" / "frames" / "000.png") as im:
        assert f"Seed: {seeds['a'][0]}," in im.text["parameters"]


def _scheme_1(movie_seed: int, frame_id: str) -> int:
    """How frame seeds were derived before issue 33, written out here as the oracle."""
    digest = hashlib.sha256(f"{movie_seed}:{frame_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_a_manifest_keeps_its_seed_scheme_and_resumes_without_rendering(tmp_path, demo_renderer):
    plan = write_plan(tmp_path / "plan.json", [movie("old", 3)], SMALL)
    path = tmp_path / "out" / "old" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": "movielm-fast/manifest@1", "settings": {"seed_scheme": 1}, "frames": []}))
    assert render(_config(tmp_path / "out"), [plan], executor=LocalExecutor(renderer=demo_renderer)).frames_rendered == 3
    manifest = json.loads(path.read_text())
    assert [f["seed"] for f in manifest["frames"]] == [_scheme_1(11, f"{i:03d}") for i in range(3)]
    del manifest["settings"]["seed_scheme"]  # as manifests were written before schemes were recorded
    path.write_text(json.dumps(manifest))
    resumed = render(_config(tmp_path / "out"), [plan], executor=LocalExecutor(renderer=demo_renderer))
    assert (resumed.frames_rendered, resumed.frames_skipped) == (0, 3)
    assert json.loads(path.read_text())["settings"]["seed_scheme"] == 1
    # A new movie in the same folder gets the current scheme.
    write_plan(plan, [movie("old", 3), movie("new", 1)], SMALL)
    render(_config(tmp_path / "out"), [plan], executor=LocalExecutor(renderer=demo_renderer))
    new = json.loads((tmp_path / "out" / "new" / "manifest.json").read_text())
    assert new["settings"]["seed_scheme"] == 2 and new["frames"][0]["seed"] != _scheme_1(11, "000")


def test_resume_skips_done_and_rerenders_changed(tmp_path, demo_renderer):
    m = movie("r", 3)
    plan = write_plan(tmp_path / "plan.json", [m], SMALL)
    out = tmp_path / "out"
    assert render(_config(out), [plan], executor=LocalExecutor(renderer=demo_renderer)).frames_rendered == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "r" / "frames").iterdir()}
    again = render(_config(out), [plan], executor=LocalExecutor(renderer=demo_renderer))
    assert again.frames_rendered == 0 and again.frames_skipped == 3
    m["frames"][1]["description"] = "Rosa alone at night"
    write_plan(plan, [m], SMALL)
    changed = render(_config(out), [plan], executor=LocalExecutor(renderer=demo_renderer))
    assert changed.frames_rendered == 1
    assert (out / "r" / "frames" / "000.png").stat().st_mtime_ns == mtimes["000.png"]
    # A corrupted image is detected by its hash and rendered again.
    (out / "r" / "frames" / "002.png").write_bytes(b"garbage")
    assert render(_config(out), [plan], executor=LocalExecutor(renderer=demo_renderer)).frames_rendered == 1
    # Command-line overrides are settings too: a new step count re-renders everything.
    cfg = _config(out, overrides=RenderSettings(steps=2))
    assert render(cfg, [plan], executor=LocalExecutor(renderer=demo_renderer)).frames_rendered == 3


def test_interrupt_loses_at_most_the_batch_in_flight(tmp_path, demo_renderer):
    plan = write_plan(tmp_path / "plan.json", [movie("k", 5)], SMALL)
    out = tmp_path / "out"
    done = []

    def progress(n, total):
        done.append(n)
        if sum(done) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render(_config(out, batch_size=2), [plan], progress=progress, executor=LocalExecutor(renderer=demo_renderer))
    manifest = json.loads((out / "k" / "manifest.json").read_text())
    assert len(manifest["frames"]) == 2
    resumed = render(_config(out, batch_size=2), [plan], executor=LocalExecutor(renderer=demo_renderer))
    assert resumed.frames_rendered == 3 and resumed.frames_skipped == 2


def test_killed_process_resumes_without_duplicates(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("kill", 6)], {**SMALL, "steps": 6})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "movielm_fast.cli.main", "render", str(plan), "--out", str(out), "--batch-size", "1",
           "--no-style-training", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = out / "kill" / "manifest.json"
    deadline = time.time() + 600  # generous: on a loaded 2-core machine the first frames can take minutes
    while time.time() < deadline:
        data = read_manifest(manifest)
        if data and len(data["frames"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_manifest(manifest)
    assert before is not None and 2 <= len(before["frames"]) < 6
    result = subprocess.run(cmd[:-1] + ["--json"], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rendered"] + summary["skipped"] == 6
    assert summary["skipped"] >= len(before["frames"])
    frames = sorted((out / "kill" / "frames").iterdir())
    assert [f.name for f in frames] == [f"{i:03d}.png" for i in range(6)]
    for f in frames:
        with Image.open(f) as im:
            im.load()  # complete and decodable


class _OOMBackend:
    """Wraps a real backend; fails like CUDA does when more than `limit` samples are denoised at once."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.sizes = inner, limit, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def denoise(self, latents, t, cond):
        self.sizes.append(latents.shape[0])
        if latents.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.denoise(latents, t, cond)


def test_out_of_memory_halves_the_batch(tmp_path, demo_renderer):
    plan = write_plan(tmp_path / "plan.json", [movie("oom", 4)], SMALL)
    oom = _OOMBackend(demo_renderer.backend, limit=2)  # CFG doubles: only batch 1 fits
    r = Renderer(demo_renderer.config, model=demo_renderer.model, backend=oom)
    summary = render(_config(tmp_path / "out", batch_size=4), [plan], executor=LocalExecutor(renderer=r))
    assert summary.frames_rendered == 4 and summary.batch_size == 1
    reference = render(_config(tmp_path / "ref", batch_size=1), [plan], executor=LocalExecutor(renderer=demo_renderer))
    assert reference.frames_rendered == 4
    for i in range(4):
        a = load_png(tmp_path / "out" / "oom" / "frames" / f"{i:03d}.png")
        b = load_png(tmp_path / "ref" / "oom" / "frames" / f"{i:03d}.png")
        assert np.abs(a - b).max() <= 2
    oom.limit = 0
    with pytest.raises(UserError, match="out of memory even at batch size 1"):
        render(_config(tmp_path / "out2", batch_size=2), [plan], executor=LocalExecutor(renderer=r))


def test_disk_full_is_a_clean_error_and_keeps_finished_frames(tmp_path, demo_renderer, monkeypatch):
    plan = write_plan(tmp_path / "plan.json", [movie("full", 3)], SMALL)
    out = tmp_path / "out"
    calls = {"n": 0}
    real_replace = os.replace

    def replace(src, dst):
        calls["n"] += 1
        if str(dst).endswith("002.png"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(paths_mod.os, "replace", replace)
    with pytest.raises(UserError, match="disk full"):
        render(_config(out, batch_size=1), [plan], executor=LocalExecutor(renderer=demo_renderer))
    monkeypatch.undo()
    kept = read_manifest(out / "full" / "manifest.json")
    assert [f["id"] for f in kept["frames"]] == ["000", "001"]
    assert not list((out / "full" / "frames").glob("*.tmp"))


# --- the command line ----------------------------------------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_cli_render_demo_json_summary(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("cli", 2)], SMALL)
    res = _cli("render", plan, "--out", tmp_path / "out", "--json", "--steps", "2")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["rendered"] == 2 and summary["storyboards"] == [str(tmp_path / "out" / "cli" / "storyboard.png")]


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model not found"),
    (["--device", "cuda"], "no usable CUDA device"),
    (["--width", "100"], "multiple of 8"),
    (["--backend", "nope"], "'nope' is not one of 'torch', 'onnxruntime', 'tensorrt', 'null'"),
    (["--dtype", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'"),
])
def test_cli_user_errors_exit_2(tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    plan = write_plan(tmp_path / "plan.json", [movie("e", 1)], SMALL)
    res = _cli("render", plan, "--out", tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_cli_plan_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = _cli("render", bad)
    assert res.exit_code == 2 and "not valid JSON" in res.output
    bad.write_text(json.dumps({"id": "x y", "style": {"name": "s"}, "frames": [], "stlye": 1}))
    res = _cli("render", bad)
    assert res.exit_code == 2
    assert "$.stlye: unknown key 'stlye': did you mean 'style'?" in res.output
    assert "$.id" in res.output and "$.frames" in res.output


def test_cli_corrupt_model_and_unwritable_out(tmp_path, tiny_sd):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    plan = write_plan(tmp_path / "plan.json", [movie("c", 1)], SMALL)
    res = _cli("render", plan, "--model", broken, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "'unet'" in res.output
    # A folder without its tokenizer: transformers alone would load it with an empty vocabulary.
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_sd, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    res = _cli("render", plan, "--model", no_tokenizer, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "has no tokenizer" in res.output and "Traceback" not in res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("render", plan, "--out", blocker / "sub")
    assert res.exit_code == 2 and "cannot write" in res.output


def test_single_file_without_offline_config_explains_conversion(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(ckpt))
    plan = write_plan(tmp_path / "plan.json", [movie("sf", 1)], SMALL)
    res = _cli("render", plan, "--model", ckpt, "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert "save_pretrained" in res.output and "Traceback" not in res.output


def test_bf16_render_is_close_to_fp32(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("bf", 1)], SMALL)
    render(RunConfig(out=tmp_path / "fp32", style_training=False), [plan], model=ModelConfig(model="demo", dtype="fp32"))
    render(RunConfig(out=tmp_path / "bf16", style_training=False), [plan], model=ModelConfig(model="demo", dtype="bf16"))
    a = load_png(tmp_path / "fp32" / "bf" / "frames" / "000.png").astype(np.float64)
    b = load_png(tmp_path / "bf16" / "bf" / "frames" / "000.png").astype(np.float64)
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-9))
    assert psnr > 20  # bf16 keeps 8 mantissa bits: close, not identical, on a random-weight model
    assert np.abs(a - b).max() > 0  # it really ran in bf16


def test_duplicate_movie_ids_across_plan_files(tmp_path):
    write_plan(tmp_path / "a.json", [movie("same", 1)], SMALL)
    write_plan(tmp_path / "b.json", [movie("same", 1)], SMALL)
    res = _cli("render", tmp_path)
    assert res.exit_code == 2 and "'same' appear in more than one plan" in res.output
