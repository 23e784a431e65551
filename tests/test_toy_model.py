"""The shipped demo model is the trained toy model, and it draws what a caption says (as the judge reads it).
The full quality figures are a benchmark (bench/toy_quality.py); this is the quick check that the shipped weights are
the trained ones and are wired as "demo"."""

import pytest
import torch

from movielm_fast.bench.toy import judge as J
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model
from movielm_fast.run.renderer import Renderer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_is_the_toy_model():
    m = load_model("demo")
    assert m.kind == "sd" and m.vae_scale_factor == 4 and m.unet.config.sample_size == 16
    assert m.scheduler_config["prediction_type"] == "epsilon"
    assert len(m.tokenizers[0]) == 49408  # the real CLIP vocabulary
    assert next(m.unet.parameters()).dtype == torch.float32  # shipped as float16, loaded as the engine asks


def test_demo_draws_the_background_and_colours_it_is_asked_for():
    r = Renderer(ModelConfig(model="demo"))
    captions = ["a big red circle on the left, on grass", "a big yellow square in the centre, at night",
                "a big white circle on the right, at sunset", "a big blue square in the centre, in the sky"]
    jobs = [FrameJob("t", str(i), c, "", 100 + i) for i, c in enumerate(captions)]
    images, _ = r.render(jobs, BatchSettings(64, 64, 12, 4.0, "dpmpp"))
    scores = [J.score(img, c) for img, c in zip(images, captions)]
    assert sum(s.background for s in scores) >= 3, [J.read(i) for i in images]
    assert sum(s.conditioning for s in scores) >= 2, [J.read(i) for i in images]
