"""Our torch backend against the oracle: diffusers' own pipelines with the same components, scheduler, prompts and
seed must give the same pixels (max abs difference <= 2/255)."""

import numpy as np
import pytest
import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.engine.schedulers import make_scheduler
from movielm_fast.run.renderer import Renderer

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


def _ours(model_path, scheduler, steps, guidance, seed, negative=NEGATIVE, size=64, prompt=PROMPT):
    r = Renderer(ModelConfig(model=str(model_path)))
    img = render_batch(r.model, r.backend, r.encoder, [FrameJob("m", "f", prompt, negative, seed)],
                       BatchSettings(size, size, steps, guidance, scheduler))[0]
    return img.astype(np.int16)


def _diffusers(cls, model_path, scheduler, steps, guidance, seed, negative=NEGATIVE, size=64, prompt=PROMPT):
    pipe = cls.from_pretrained(model_path, local_files_only=True)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    # An empty negative prompt in a plan means "none", which is diffusers' negative_prompt=None.
    out = pipe(prompt, negative_prompt=negative or None, guidance_scale=guidance, num_inference_steps=steps,
               height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (out * 255).round().astype(np.int16)


@pytest.mark.parametrize("scheduler,guidance", [("dpmpp", 7.5), ("euler_a", 5.0), ("ddim", 7.5), ("unipc", 1.0)])
def test_sd1_matches_diffusers(tiny_sd, scheduler, guidance):
    from diffusers import StableDiffusionPipeline

    ours = _ours(tiny_sd, scheduler, 4, guidance, seed=42)
    ref = _diffusers(StableDiffusionPipeline, tiny_sd, scheduler, 4, guidance, seed=42)
    assert ours.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours - ref).max() <= 2
    assert ours.std() > 1  # a real image, not a constant


def test_sd2_v_prediction_matches_diffusers(tiny_sd_v):
    from diffusers import StableDiffusionPipeline

    ours = _ours(tiny_sd_v, "euler", 4, 7.5, seed=3)
    ref = _diffusers(StableDiffusionPipeline, tiny_sd_v, "euler", 4, 7.5, seed=3)
    assert np.abs(ours - ref).max() <= 2


@pytest.mark.parametrize("scheduler,negative", [("dpmpp", NEGATIVE), ("euler", "")])
def test_sdxl_matches_diffusers(tiny_sdxl, scheduler, negative):
    from diffusers import StableDiffusionXLPipeline

    ours = _ours(tiny_sdxl, scheduler, 4, 6.0, seed=7, negative=negative)
    ref = _diffusers(StableDiffusionXLPipeline, tiny_sdxl, scheduler, 4, 6.0, seed=7, negative=negative)
    assert np.abs(ours - ref).max() <= 2
    assert ours.std() > 1


def test_non_square_matches_diffusers(tiny_sd):
    from diffusers import StableDiffusionPipeline

    r = Renderer(ModelConfig(model=str(tiny_sd)))
    ours = render_batch(r.model, r.backend, r.encoder, [FrameJob("m", "f", PROMPT, NEGATIVE, 5)],
                        BatchSettings(96, 64, 3, 7.5, "dpmpp"))[0].astype(np.int16)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.scheduler = make_scheduler("dpmpp", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, height=64, width=96,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert ours.shape == (64, 96, 3)
    assert np.abs(ours - (ref * 255).round()).max() <= 2


def test_guidance_distilled_lcm_unet_matches_diffusers(tmp_path):
    """LCM-distilled UNets take the guidance as an embedding (timestep_cond) instead of a CFG batch."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from movielm_fast.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd")
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "time_cond_proj_dim": 16})
    pipe.register_to_config()  # keep model_index.json consistent with the swapped component
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    ours = _ours(tmp_path, "lcm", 4, 8.0, seed=9)
    ref = _diffusers(StableDiffusionPipeline, tmp_path, "lcm", 4, 8.0, seed=9)
    assert np.abs(ours - ref).max() <= 2
    # The guidance really is an input: another value gives another image.
    assert np.abs(_ours(tmp_path, "lcm", 4, 2.0, seed=9) - ours).max() > 2
