"""Scheduler options few-step models need (SDXL-Lightning, Hyper-SD, LCM-LoRA): trailing timestep spacing, LCM and
TCD, and guidance <= 1 without a CFG batch. Oracle: diffusers' pipelines with the scheduler built by diffusers
itself from the same config and options."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.schedulers import make_scheduler
from movielm_fast.run.renderer import Renderer
from tests.helpers import SpyBackend, cli_json, movie, write_plan

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


def _diffusers(cls, model_path, scheduler_cls, spacing, steps, guidance, seed):
    import diffusers

    pipe = cls.from_pretrained(model_path, local_files_only=True)
    extra = {"timestep_spacing": spacing} if spacing else {}
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=guidance, num_inference_steps=steps, height=64,
               width=64, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (out * 255).round().astype(np.int16)


class CountingBackend(SpyBackend):
    """The torch backend, recording the UNet batch of every call."""

    def __init__(self, inner):
        super().__init__(inner)
        self.batches = []

    def seen(self, latents, t, cond):
        self.batches.append(latents.shape[0])


# (our scheduler, diffusers' class, spacing, steps, guidance): SDXL-Lightning (euler, trailing, guidance 0),
# Hyper-SD (DDIM or TCD, trailing, guidance 0), LCM-LoRA on a plain UNet (lcm, guidance 1).
RECIPES = [("euler", "EulerDiscreteScheduler", "trailing", 4, 0.0),
           ("ddim", "DDIMScheduler", "trailing", 2, 0.0),
           ("tcd", "TCDScheduler", "trailing", 4, 1.0),
           ("lcm", "LCMScheduler", None, 4, 1.0),
           ("euler", "EulerDiscreteScheduler", "linspace", 3, 3.0)]


@pytest.mark.parametrize("name,cls_name,spacing,steps,guidance", RECIPES)
def test_few_step_recipes_match_diffusers(tiny_sd, name, cls_name, spacing, steps, guidance):
    from diffusers import StableDiffusionPipeline

    r = Renderer(ModelConfig(model=str(tiny_sd)))
    s = BatchSettings(64, 64, steps, guidance, name, timestep_spacing=spacing)
    ours = r.render([FrameJob("m", "f", PROMPT, NEGATIVE, 21)], s)[0][0].astype(np.int16)
    ref = _diffusers(StableDiffusionPipeline, tiny_sd, cls_name, spacing, steps, guidance, seed=21)
    assert np.abs(ours - ref).max() <= 2
    assert ours.std() > 1


def test_sdxl_lightning_recipe_matches_diffusers(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    s = BatchSettings(64, 64, 4, 0.0, "euler", timestep_spacing="trailing")
    ours = r.render([FrameJob("m", "f", PROMPT, NEGATIVE, 4)], s)[0][0].astype(np.int16)
    ref = _diffusers(StableDiffusionXLPipeline, tiny_sdxl, "EulerDiscreteScheduler", "trailing", 4, 0.0, seed=4)
    assert np.abs(ours - ref).max() <= 2


def test_trailing_starts_at_the_last_training_timestep(tiny_sd):
    from movielm_fast.engine.models import load_model

    config = load_model(tiny_sd).scheduler_config  # "leading" with steps_offset 1, as SD 1.5's
    lead, trail = make_scheduler("euler", config), make_scheduler("euler", config, "trailing")
    lead.set_timesteps(4)
    trail.set_timesteps(4)
    assert int(trail.timesteps[0]) == 999 and int(lead.timesteps[0]) < 800
    with pytest.raises(Exception, match="timestep spacing"):
        make_scheduler("euler", config, "sideways")


@pytest.mark.parametrize("guidance,doubled", [(0.0, False), (1.0, False), (1.5, True)])
def test_guidance_at_most_one_runs_no_cfg_batch(tiny_sd, guidance, doubled):
    r = Renderer(ModelConfig(model=str(tiny_sd)))
    counting = CountingBackend(r.backend)
    r.backend = counting
    r.render([FrameJob("m", "a", PROMPT, NEGATIVE, 1), FrameJob("m", "b", PROMPT, NEGATIVE, 2)],
             BatchSettings(64, 64, 2, guidance, "euler", timestep_spacing="trailing"))
    assert counting.batches == [4 if doubled else 2] * 2


def test_timestep_spacing_flag_and_resume_key(tmp_path, tiny_sd):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1)], defaults={"width": 64, "height": 64, "steps": 2,
                                                                         "scheduler": "euler", "guidance": 0})
    out = tmp_path / "out"
    base = ["render", str(plan), "--model", str(tiny_sd), "--out", str(out), "--no-style-training", "--json"]

    def run(*extra):
        return cli_json(base + list(extra))

    assert run("--timestep-spacing", "trailing")["rendered"] == 1
    entry = json.loads((out / "m" / "manifest.json").read_text())["frames"][0]
    assert entry["timestep_spacing"] == "trailing"
    assert run("--timestep-spacing", "trailing")["skipped"] == 1
    assert run()["rendered"] == 1
    bad = CliRunner().invoke(cli, base + ["--timestep-spacing", "sideways"])
    assert bad.exit_code != 0 and "sideways" in bad.output
