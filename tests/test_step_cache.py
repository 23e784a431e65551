"""Step caching (--step-cache, engine/step_cache.py): the schedule, exactness of the full step, keys, refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.step_cache import CachedUNet, StepCache, check_step_cache
from movielm_fast.errors import UserError
from movielm_fast.export.graphs import UNetGraph
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.renderer import Renderer
from tests.helpers import movie, write_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"width": 64, "height": 64, "steps": 6, "guidance": 7.5, "seed": 11}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def renderer(request, tiny_sd, tiny_sdxl):
    return Renderer(ModelConfig(model=str(tiny_sd if request.param == "sd" else tiny_sdxl)))


def _unet_inputs(unet, batch=2, h=8, w=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, h, w, generator=g)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    if unet.config.addition_embed_type == "text_time":
        dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        return x, torch.tensor(400.0), ehs, torch.randn(batch, dim, generator=g), torch.randn(batch, 6, generator=g)
    return x, torch.tensor(400.0), ehs, None, None


def test_schedule_full_every_nth_step():
    assert StepCache(3).full_steps(7) == [True, False, False, True, False, False, True]
    assert StepCache(1).full_steps(3) == [True, True, True]
    assert check_step_cache(None, 0, "torch") is None
    assert check_step_cache(1, 2, "torch") is None  # every step full: the plain render, frames keep their keys
    assert check_step_cache(3, 1, "torch") == StepCache(3, 1)


@pytest.mark.parametrize("interval, depth, backend, words", [
    (0, 0, "torch", "1 or more"), (3, -1, "torch", "negative"), (3, 0, "onnxruntime", "--backend torch")])
def test_bad_settings_refused(interval, depth, backend, words):
    with pytest.raises(UserError) as exc:
        check_step_cache(interval, depth, backend)
    assert words in exc.value.message and exc.value.hint


@torch.inference_mode()
def test_full_step_is_the_unet_bit_for_bit(renderer):
    unet = renderer.model.unet
    args = _unet_inputs(unet)
    plain = UNetGraph(unet)(*args)
    skips = len(CachedUNet(unet, 0).up_layers)
    for depth in range(skips):
        cached = CachedUNet(unet, depth)
        noise, deep = cached.full(*args)
        assert torch.equal(noise, plain), depth
        # The shallow path with this very step's features recomputes the rest exactly.
        assert torch.equal(cached.shallow(*args, deep=deep), plain), depth
        # With other features the output changes: the shallow path really uses them.
        assert not torch.equal(cached.shallow(*args, deep=deep * 0.5), plain), depth
    with pytest.raises(UserError, match="skip branches 0-"):
        CachedUNet(unet, skips)


def _resnet_calls(unet, run):
    """Calls per step of each resnet of the UNet (forward hooks), while `run()` renders."""
    names = [n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    calls: dict[str, int] = dict.fromkeys(names, 0)
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in unet.named_modules() if n in calls]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls


def _frame(renderer, settings, seed=5, prompt="Rosa dances in the ballroom"):
    jobs = [FrameJob("m", "f", prompt, "", seed), FrameJob("m", "g", "an empty room", "", seed + 1)]
    return np.stack(list(render_batch(renderer.model, renderer.backend, renderer.encoder, jobs, settings)))


def test_schedule_runs_deep_layers_only_on_full_steps(renderer):
    unet = renderer.model.unet
    steps, interval = 7, 3
    s = BatchSettings(64, 64, steps, 7.5, "dpmpp", step_cache=StepCache(interval, 0))
    calls = _resnet_calls(unet, lambda: _frame(renderer, s))
    full = sum(StepCache(interval).full_steps(steps))  # steps 0, 3, 6
    outermost_up = [n for n in calls if n.startswith(f"up_blocks.{len(unet.up_blocks) - 1}.resnets")][-1]
    # Branch 0: a cached step runs one resnet, the last of the last up block; every other runs on full steps only.
    assert calls.pop(outermost_up) == steps
    assert set(calls.values()) == {full}


def test_deeper_branch_recomputes_more(renderer):
    s = BatchSettings(64, 64, 6, 7.5, "dpmpp", step_cache=StepCache(3, 2))
    calls = _resnet_calls(renderer.model.unet, lambda: _frame(renderer, s))
    every = sorted(n for n, c in calls.items() if c == 6)
    # These UNets: down_blocks.0 (a resnet, a downsampler) makes skips 1 and 2, down_blocks.1 skip 3; up_blocks.0
    # takes skips 3 and 2, up_blocks.1 skips 1 and 0. Branch 2 recomputes the layers that make or take skips 0-2.
    assert every == ["down_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0",
                     "up_blocks.1.resnets.1"]
    assert {c for n, c in calls.items() if n not in every} == {2}  # mid block and deeper: full steps only


def test_interval_one_is_bit_identical_to_the_plain_render(renderer):
    s = BatchSettings(64, 64, 4, 7.5, "dpmpp")
    plain = _frame(renderer, s)
    assert np.array_equal(_frame(renderer, replace(s, step_cache=StepCache(1, 0))), plain)
    cached = _frame(renderer, replace(s, step_cache=StepCache(2, 0)))
    assert not np.array_equal(cached, plain)  # the cache is really used from interval 2


def test_batch_and_cfg_invariance(renderer):
    """Each frame of a batch reads its own rows of the cached features: alone or batched, the same frame."""
    s = BatchSettings(64, 64, 6, 7.5, "dpmpp", step_cache=StepCache(3, 0))
    both = _frame(renderer, s)
    alone = np.asarray(render_batch(renderer.model, renderer.backend, renderer.encoder,
                                    [FrameJob("m", "f", "Rosa dances in the ballroom", "", 5)], s)[0])
    assert np.abs(both[0].astype(int) - alone.astype(int)).max() <= 1


def test_keys_manifest_and_resume(tmp_path, tiny_sd):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 2)], SMALL)
    base = Renderer(ModelConfig(model=str(tiny_sd)))
    cached = Renderer(ModelConfig(model=str(tiny_sd), step_cache=3, step_cache_depth=1), model=base.model)

    def run(renderer, **cfg):
        return render(RunConfig(out=tmp_path / "out", style_training=False, **cfg), [plan],
                      executor=LocalExecutor(renderer=renderer))

    assert run(base).frames_rendered == 2
    manifest = json.loads((tmp_path / "out" / "m" / "manifest.json").read_text())
    assert "step_cache" not in manifest["settings"] and all("step_cache" not in f for f in manifest["frames"])
    plain_keys = [{k: v for k, v in f.items() if k not in ("sha256", "seconds")} for f in manifest["frames"]]

    assert run(cached).frames_rendered == 2  # another (lossy) render: the plain frames are not reused
    manifest = json.loads((tmp_path / "out" / "m" / "manifest.json").read_text())
    assert manifest["settings"]["step_cache"] == {"interval": 3, "depth": 1}
    assert all(f["step_cache"] == {"interval": 3, "depth": 1} for f in manifest["frames"])
    assert run(cached).frames_skipped == 2  # same flags: resumed

    assert run(base).frames_rendered == 2  # back to the plain render: the plain keys, exactly as before
    manifest = json.loads((tmp_path / "out" / "m" / "manifest.json").read_text())
    assert [{k: v for k, v in f.items() if k not in ("sha256", "seconds")} for f in manifest["frames"]] == plain_keys


def test_consistency_mode_refused(tmp_path, tiny_sd):
    m = movie("c", 2, render={"consistency": {"mode": "anchor_attention"}})
    plan = write_plan(tmp_path / "plan.json", [m], SMALL)
    r = Renderer(ModelConfig(model=str(tiny_sd), step_cache=3))
    summary = render(RunConfig(out=tmp_path / "out", style_training=False), [plan], executor=LocalExecutor(renderer=r))
    assert summary.frames_rendered == 0 and len(summary.failures) == 1
    assert "consistency mode cannot run with --step-cache" in summary.failures[0]["reason"]


def test_cli_flags(tmp_path):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1)], SMALL)
    result = CliRunner().invoke(cli, ["render", str(plan), "--out", str(tmp_path / "o"), "--step-cache", "0"])
    assert result.exit_code == 2 and "--step-cache" in result.output  # click's range check
    result = CliRunner().invoke(cli, ["render", str(plan), "--out", str(tmp_path / "o"), "--no-style-training",
                                      "--backend", "null", "--step-cache", "3"])
    assert result.exit_code != 0 and "--step-cache needs --backend torch" in result.output


@pytest.mark.gpu
def test_cuda_graphs_replay_both_steps(tiny_sd):
    """The full and the cached step are captured as two graphs; the features cross between them unchanged."""
    eager = Renderer(ModelConfig(model=str(tiny_sd), device="cuda"))
    graphed = Renderer(ModelConfig(model=str(tiny_sd), device="cuda", cuda_graphs=True))
    s = BatchSettings(64, 64, 7, 7.5, "dpmpp", step_cache=StepCache(3, 0))
    a, b = _frame(eager, s), _frame(graphed, s)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not np.array_equal(_frame(eager, replace(s, step_cache=None)), a)
