"""LoRA on the transformer families: diffusers/PEFT and kohya FLUX files merged into the weights in place, matching
diffusers' own load_lora_weights + fuse_lora (max abs difference <= 2/255); switching back restores the model."""

import numpy as np
import pytest
import torch

from movielm_fast.engine import lora
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.errors import UserError
from movielm_fast.run.renderer import Renderer
from movielm_fast.testing import make_random_dit_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def _ours(r, loras=(), guidance=3.5, seed=42):
    s = BatchSettings(64, 64, 3, guidance, "default", loras=loras)
    return render_batch(r.model, r.backend, r.encoder, [FrameJob("m", "f", PROMPT, "", seed)], s,
                        library=r.loras)[0].astype(np.int16)


@pytest.mark.parametrize("fixture,fmt,guidance", [("tiny_flux_dev", "diffusers", 3.5), ("tiny_flux_dev", "kohya", 3.5),
                                                  ("tiny_klein", "diffusers", 4.0)])
def test_lora_matches_diffusers_fuse_lora(request, tmp_path, fixture, fmt, guidance):
    from diffusers import DiffusionPipeline

    path = request.getfixturevalue(fixture)
    r = Renderer(ModelConfig(model=str(path)))
    clip = r.model.text_encoders[0] if fixture == "tiny_flux_dev" else None  # klein: the transformer only
    f = make_random_dit_lora(tmp_path / "l.safetensors", r.model.transformer, clip, fmt, seed=3, std=0.2)
    plain = _ours(r, guidance=guidance)
    ours = _ours(r, lora.combine([(f, 0.8)]), guidance=guidance)
    layers = r.loras.layers(lora.lora_ref(f, 0.8))
    assert {x.component for x in layers} == ({"transformer", "text_encoder"} if clip is not None else {"transformer"})

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(f))
    # diffusers' FLUX pipelines fuse only the transformer unless told: a text encoder LoRA would stay at scale 1
    pipe.fuse_lora(components=["transformer"] + (["text_encoder"] if clip is not None else []), lora_scale=0.8)
    ref = pipe(prompt=PROMPT, guidance_scale=guidance, num_inference_steps=3, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(42), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - plain).max() > 10  # the LoRA really changes the image
    assert np.array_equal(_ours(r, guidance=guidance), plain)  # and the plain set brings the model back exactly


def test_kohya_and_diffusers_flux_names_give_the_same_layers(tmp_path, tiny_flux_dev):
    r = Renderer(ModelConfig(model=str(tiny_flux_dev)))
    kohya = r.loras.layers(lora.lora_ref(make_random_dit_lora(tmp_path / "k.safetensors", r.model.transformer,
                                                              r.model.text_encoders[0], "kohya"), 1.0))
    names = {(x.component, x.param) for x in kohya}
    # kohya's fused qkv reaches each of diffusers' separate projections, in the graph's names (export/graphs.py)
    assert ("transformer", "transformer.transformer_blocks.0.attn.to_q.weight") in names
    assert ("transformer", "transformer.transformer_blocks.0.attn.add_v_proj.weight") in names
    assert any(c == "text_encoder" for c, _ in names)


def test_sd_lora_on_flux_is_refused_by_name(tmp_path, tiny_flux_dev, tiny_sd):
    from movielm_fast.engine.models import load_model
    from movielm_fast.testing import make_random_lora

    sd = load_model(str(tiny_sd))
    f = make_random_lora(tmp_path / "sd.safetensors", sd.unet, sd.text_encoders, "diffusers")
    with pytest.raises(UserError, match=r"(?s)is a LoRA for another kind of model.*use a LoRA made for FLUX.1"):
        Renderer(ModelConfig(model=str(tiny_flux_dev), loras=((str(f), 1.0),)))
