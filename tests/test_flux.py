"""The transformer families (FLUX.1 [dev]/[schnell], FLUX.2 [klein]) against the oracle: diffusers' own FluxPipeline
and Flux2KleinPipeline with the same folder, prompt, seed, steps, size and guidance give the same pixels (max abs
difference <= 2/255); and the engine's properties hold for them (a frame is the same in any batch, resume, errors
that name what is wrong)."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.families import family_of_spec
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model, model_defaults
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.errors import UserError
from movielm_fast.run.renderer import Renderer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"
SIZE = 64


def _renderer(path, **config) -> Renderer:
    return Renderer(ModelConfig(model=str(path), **config))


def _ours(r: Renderer, steps, guidance, seeds, negative="", true_cfg=1.0, size=SIZE, prompt=PROMPT):
    jobs = [FrameJob("m", f"f{i}", prompt, negative, seed) for i, seed in enumerate(seeds)]
    images = render_batch(r.model, r.backend, r.encoder, jobs,
                          BatchSettings(size, size, steps, guidance, "default", true_cfg=true_cfg))
    return [im.astype(np.int16) for im in images]


def _pipe(cls, path):
    pipe = cls.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(out) -> np.ndarray:
    return (out.images[0] * 255).round().astype(np.int16)


@pytest.mark.parametrize("fixture,guidance", [("tiny_flux_dev", 3.5), ("tiny_flux_schnell", 0.0)])
def test_flux1_matches_diffusers(request, fixture, guidance):
    from diffusers import FluxPipeline

    path = request.getfixturevalue(fixture)
    ours = _ours(_renderer(path), 4, guidance, [42])[0]
    ref = _images(_pipe(FluxPipeline, path)(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4,
                                             guidance_scale=guidance, generator=torch.Generator().manual_seed(42),
                                             output_type="np"))
    assert ours.shape == ref.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - ref).max() <= 2
    assert ours.std() > 1  # a real image, not a constant


def test_flux1_dev_guidance_is_embedded(tiny_flux_dev):
    """[dev] takes the guidance as an input (no CFG batch): another value gives another image."""
    r = _renderer(tiny_flux_dev)
    assert np.abs(_ours(r, 3, 3.5, [5])[0] - _ours(r, 3, 1.5, [5])[0]).max() > 2


def test_flux1_true_cfg_matches_diffusers(tiny_flux_dev):
    from diffusers import FluxPipeline

    ours = _ours(_renderer(tiny_flux_dev), 4, 3.5, [7], negative=NEGATIVE, true_cfg=4.0)[0]
    ref = _images(_pipe(FluxPipeline, tiny_flux_dev)(
        PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=4,
        guidance_scale=3.5, generator=torch.Generator().manual_seed(7), output_type="np"))
    assert np.abs(ours - ref).max() <= 2
    plain = _ours(_renderer(tiny_flux_dev), 4, 3.5, [7], negative=NEGATIVE)[0]  # true_cfg 1: the negative is unused
    assert np.abs(ours - plain).max() > 2


@pytest.mark.parametrize("fixture,guidance", [("tiny_klein", 4.0), ("tiny_klein_distilled", 1.0)])
def test_klein_matches_diffusers(request, fixture, guidance):
    from diffusers import Flux2KleinPipeline

    path = request.getfixturevalue(fixture)
    ours = _ours(_renderer(path), 4, guidance, [42])[0]
    ref = _images(_pipe(Flux2KleinPipeline, path)(
        prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(42), output_type="np"))
    assert np.abs(ours - ref).max() <= 2
    assert ours.std() > 1


def test_klein_negative_prompt_matches_diffusers(tiny_klein):
    """klein base runs CFG against the plan's negative prompt: diffusers with that prompt's embeddings as
    negative_prompt_embeds (its pipeline otherwise always uses the empty prompt)."""
    from diffusers import Flux2KleinPipeline

    pipe = _pipe(Flux2KleinPipeline, tiny_klein)
    negative, _ = pipe.encode_prompt(NEGATIVE, device=torch.device("cpu"))
    ref = _images(pipe(prompt=PROMPT, negative_prompt_embeds=negative, height=SIZE, width=SIZE, num_inference_steps=3,
                       guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="np"))
    ours = _ours(_renderer(tiny_klein), 3, 4.0, [3], negative=NEGATIVE)[0]
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - _ours(_renderer(tiny_klein), 3, 4.0, [3])[0]).max() > 2  # the negative prompt counts


def test_non_square_matches_diffusers(tiny_flux_dev):
    from diffusers import FluxPipeline

    r = _renderer(tiny_flux_dev)
    jobs = [FrameJob("m", "f", PROMPT, "", 11)]
    ours = render_batch(r.model, r.backend, r.encoder, jobs, BatchSettings(96, 64, 3, 3.5, "default"))[0]
    ref = _images(_pipe(FluxPipeline, tiny_flux_dev)(PROMPT, height=64, width=96, num_inference_steps=3,
                                                      generator=torch.Generator().manual_seed(11), output_type="np"))
    assert ours.shape == (64, 96, 3) and np.abs(ours.astype(np.int16) - ref).max() <= 2


@pytest.mark.parametrize("fixture,guidance,true_cfg", [("tiny_flux_dev", 3.5, 3.0), ("tiny_klein", 4.0, 1.0)])
def test_frame_is_the_same_in_any_batch(request, fixture, guidance, true_cfg):
    """Frame k of a batch of 4 (with its CFG batch) is the frame rendered alone (diffusers draws each frame's noise
    from its own generator at batch size 1)."""
    r = _renderer(request.getfixturevalue(fixture))
    seeds = [3, 1_000_003, 77, 2**40 + 5]
    batch = _ours(r, 3, guidance, seeds, negative=NEGATIVE, true_cfg=true_cfg)
    for seed, image in zip(seeds, batch):
        alone = _ours(r, 3, guidance, [seed], negative=NEGATIVE, true_cfg=true_cfg)[0]
        assert np.abs(image - alone).max() <= 2
    assert np.abs(batch[0] - batch[1]).max() > 2  # different seeds, different frames


def test_schedule_shift_is_diffusers(tiny_flux_dev):
    """Our `mu` of the dynamic shift is diffusers' own for every image size and step count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from movielm_fast.engine.families.flux import flux1_mu, flux2_mu

    config = json.loads((tiny_flux_dev / "scheduler" / "scheduler_config.json").read_text())
    for tokens in (16, 256, 1024, 4096, 4301, 9216):
        assert flux1_mu(tokens, config) == pytest.approx(calculate_shift(tokens), abs=1e-12)
        for steps in (1, 4, 28, 50, 200):
            assert flux2_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps), abs=1e-9)


# --- loading: recognised from model_index.json, a missing or mismatched part named ------------------------------

def test_recognised_from_model_index(tiny_flux_dev, tiny_klein_distilled):
    assert family_of_spec(tiny_flux_dev).name == "FLUX.1"
    assert family_of_spec(tiny_klein_distilled).name == "FLUX.2 [klein]"
    flux, klein = load_model(str(tiny_flux_dev)), load_model(str(tiny_klein_distilled))
    assert (flux.kind, klein.kind, klein.distilled) == ("flux1", "flux2-klein", True)
    assert flux.unet is None and type(flux.transformer).__name__ == "FluxTransformer2DModel"
    assert [type(e).__name__ for e in flux.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("break_it,message", [
    (lambda p: _edit_json(p / "model_index.json", text_encoder_2=[None, None]), "without its text_encoder_2"),
    (lambda p: shutil.rmtree(p / "text_encoder_2"), "no text_encoder_2/ folder"),
    (lambda p: _edit_json(p / "model_index.json", transformer=["diffusers", "SD3Transformer2DModel"]),
     "transformer of this FluxPipeline folder is a SD3Transformer2DModel"),
    (lambda p: _edit_json(p / "vae" / "config.json", latent_channels=16), "the transformer and the vae do not fit"),
    (lambda p: _edit_json(p / "text_encoder_2" / "config.json", d_model=64), "T5 text width: 32 vs 64"),
    (lambda p: (p / "transformer" / "config.json").unlink(), "cannot read"),
])
def test_broken_flux_folder_is_named(tiny_flux_dev, tmp_path, break_it, message):
    path = _copy(tiny_flux_dev, tmp_path)
    break_it(path)
    with pytest.raises(UserError, match=message):
        load_model(str(path))


def test_klein_with_too_few_text_encoder_layers(tiny_klein, tmp_path):
    path = _copy(tiny_klein, tmp_path)
    _edit_json(path / "text_encoder" / "config.json", num_hidden_layers=12)
    with pytest.raises(UserError, match="reads the hidden states of layers 9, 18, 27"):
        load_model(str(path))


# --- settings: the model's kind, and what each family cannot do yet ---------------------------------------------

def test_defaults_by_kind(tiny_flux_dev, tiny_flux_schnell, tiny_klein, tiny_klein_distilled):
    expect = {tiny_flux_dev: (28, 3.5), tiny_flux_schnell: (4, 0.0), tiny_klein: (50, 4.0),
              tiny_klein_distilled: (4, 1.0)}
    for path, (steps, guidance) in expect.items():
        d = model_defaults(load_model(str(path)))
        assert d == {"width": 1024, "height": 1024, "steps": steps, "guidance": guidance, "scheduler": "default"}


@pytest.mark.parametrize("config,message", [
    ({"consistency": "anchor_attention"}, "--consistency anchor_attention is not available"),
    ({"dtype": "fp16"}, "overflows in fp16"),
])
def test_options_not_yet_for_flux_fail_before_loading(tiny_flux_dev, config, message):
    with pytest.raises(UserError, match=message):
        _renderer(tiny_flux_dev, **config)


# --- through the command line: plans, resume, metadata, one-time warnings ---------------------------------------

def _plan(tmp_path, render=None):
    from tests.helpers import movie, write_plan

    return write_plan(tmp_path / "plan.json", [movie("fx", 3, **({"render": render} if render else {}))],
                      {"width": SIZE, "height": SIZE, "steps": 2})


def test_cli_render_resume_and_forge_metadata(tiny_flux_dev, tmp_path):
    from PIL import Image

    from tests.helpers import cli_json

    plan, out = _plan(tmp_path, {"true_cfg": 2.0, "negative_prompt": NEGATIVE}), tmp_path / "out"
    args = ["render", str(plan), "--model", str(tiny_flux_dev), "--out", str(out), "--json"]
    first = cli_json(args)
    assert first["rendered"] == 3 and first["skipped"] == 0
    again = cli_json(args)  # resume: every frame's key matches, nothing is rendered
    assert again["rendered"] == 0 and again["skipped"] == 3
    manifest = json.loads((out / "fx" / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "flux1" and manifest["settings"]["scheduler"] == "default"
    assert all(f["true_cfg"] == 2.0 for f in manifest["frames"])
    with Image.open(out / "fx" / "frames" / "000.png") as im:
        params = im.text["parameters"]
    assert "Steps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 2.0, Distilled CFG Scale: 3.5, Seed: " in params
    assert f"Negative prompt: {NEGATIVE}" in params
    # Another true CFG scale is another frame.
    changed = cli_json(args + ["--true-cfg", "3"])
    assert changed["rendered"] == 3


def test_klein_metadata_and_ignored_settings_warned_once(tiny_klein_distilled, tmp_path, caplog):
    from PIL import Image

    from tests.helpers import cli_json, movie, write_plan

    plan = write_plan(tmp_path / "plan.json", [movie("a", 2), movie("b", 1)],
                      {"width": SIZE, "height": SIZE, "steps": 2, "guidance": 3.0, "negative_prompt": NEGATIVE})
    with caplog.at_level(logging.WARNING, logger="movielm_fast"):
        summary = cli_json(["render", str(plan), "--model", str(tiny_klein_distilled), "--out", str(tmp_path / "o"),
                            "--json"])
    assert summary["rendered"] == 3
    ignored = [r.getMessage() for r in caplog.records if "runs without guidance" in r.getMessage()]
    assert sorted(ignored) == ["FLUX.2 [klein] (step-distilled) runs without guidance: guidance 3.0 is ignored",
                               "FLUX.2 [klein] (step-distilled) runs without guidance: the negative prompt is ignored"]
    with Image.open(tmp_path / "o" / "a" / "frames" / "000.png") as im:
        assert "Sampler: Euler, Schedule type: Simple, CFG scale: 3.0, Seed: " in im.text["parameters"]


def test_settings_the_family_cannot_render_fail_the_movie(tiny_flux_schnell, tmp_path):
    from movielm_fast.plan import load_plan

    r = _renderer(tiny_flux_schnell)
    cases = [({"scheduler": "dpmpp"}, "samples with its own flow-matching Euler scheduler"),
             ({"width": 72}, "width 72 is not a multiple of 16"),
             ({"timestep_spacing": "trailing"}, "timestep_spacing 'trailing' is not available for FLUX.1"),
             ({"consistency": {"mode": "anchor_attention"}}, "consistency mode 'anchor_attention' is not available")]
    for render, message in cases:
        (lm,) = load_plan(_plan(tmp_path, render))
        with pytest.raises(UserError, match=message):
            r.plan(lm, None, None)


def test_long_prompt_cut_warning_says_how_much(tiny_flux_schnell, caplog):
    r = _renderer(tiny_flux_schnell)
    long_prompt = " ".join(["lighthouse"] * 100)  # 100 CLIP tokens, 100 T5 tokens
    with caplog.at_level(logging.WARNING, logger="movielm_fast"):
        assert r.encoder.pair_chunks(long_prompt, "") == 1
        r.encoder.pair_chunks(long_prompt, "")  # once per prompt
    cut = [rec.getMessage() for rec in caplog.records if "is cut" in rec.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("a prompt of 102 CLIP tokens is cut to the encoder's 77: 25 tokens "
                                                 "are lost")


# --- textual inversion: a token in each encoder's table, no re-export ---------------------------------------------

def test_flux1_textual_inversion_matches_diffusers(tiny_flux_dev, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model

    torch.manual_seed(1)
    clip_l, t5 = torch.randn(2, 32), torch.randn(2, 32)  # two vectors each: <sx> and <sx>_1
    file = tmp_path / "style.safetensors"
    save_file({"clip_l": clip_l, "t5": t5}, str(file))
    pipe = _pipe(FluxPipeline, tiny_flux_dev)
    pipe.load_textual_inversion(clip_l, token="<sx>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(t5, token="<sx>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = "<sx> a lighthouse at night"
    ref, ref_pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=torch.device("cpu"))

    r = _renderer(tiny_flux_dev)
    r.encoder.add_token("<sx>", vectors_for_model(load_embedding(file), "flux1"), str(file))
    ours = r.encoder.encode(prompt)
    # T5's states reach ~3 here: 1e-4 is float32 rounding of a different op order (seen: 1.3e-5)
    assert torch.allclose(ours.hidden, ref, atol=1e-4) and torch.allclose(ours.pooled, ref_pooled, atol=1e-5)
    assert not torch.allclose(ours.hidden, r.encoder.encode("a lighthouse at night").hidden, atol=1e-3)
    # The encoders themselves are unchanged (one exported graph serves any token): their tables have no new rows.
    assert [e.get_input_embeddings().weight.shape[0] for e in r.model.text_encoders] == [49408, 85]
    with pytest.raises(UserError, match="has no t5 vectors"):
        save_file({"clip_l": clip_l, "clip_g": clip_l.clone()}, str(tmp_path / "xl.safetensors"))
        vectors_for_model(load_embedding(tmp_path / "xl.safetensors"), "flux1")


def test_klein_textual_inversion_matches_transformers(tiny_klein, tmp_path):
    """Flux2KleinPipeline has no textual-inversion loader: the token is added the way transformers adds one (a new
    tokenizer entry, a new embedding row), and its encode_prompt is the oracle."""
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import save_file

    from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model

    torch.manual_seed(2)
    vector = torch.randn(1, 16)
    file = tmp_path / "style.safetensors"
    save_file({"qwen3": vector}, str(file))
    pipe = _pipe(Flux2KleinPipeline, tiny_klein)
    pipe.tokenizer.add_tokens(["<kx>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<kx>")] = vector[0]
    prompt = "a garden at night, <kx>"
    ref, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"))

    r = _renderer(tiny_klein)
    r.encoder.add_token("<kx>", vectors_for_model(load_embedding(file), "flux2-klein"), str(file))
    assert torch.allclose(r.encoder.encode(prompt).hidden, ref, atol=1e-5)


# --- real sizes: bf16 by default on CUDA, offloaded text encoders, a clear error when weights cannot fit ----------

def test_dtype_auto_is_bf16_for_flux_on_cuda(tiny_flux_dev, tiny_sd, monkeypatch, caplog):
    """`--dtype auto` resolves by family before anything loads. No GPU here: CUDA is said to be there so that the
    resolution runs; nothing is put on a device."""
    from movielm_fast.engine.families import family_of_spec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="movielm_fast"):
        flux = Renderer._auto_dtype(ModelConfig(model=str(tiny_flux_dev), device="cuda"), family_of_spec(tiny_flux_dev))
    assert flux.dtype_name == "bf16" and "--dtype auto: bf16 for FLUX.1" in caplog.text
    sd = Renderer._auto_dtype(ModelConfig(model=str(tiny_sd), device="cuda"), family_of_spec(tiny_sd))
    assert sd.dtype_name == "fp16"  # unchanged for Stable Diffusion
    explicit = ModelConfig(model=str(tiny_flux_dev), device="cuda", dtype="fp32")
    assert Renderer._auto_dtype(explicit, family_of_spec(tiny_flux_dev)) is explicit


def test_offloaded_text_encoders_visit_the_device_only_to_encode(tiny_flux_schnell):
    """Each encoder goes to the backend's device for a batch's new prompts and back to the host right after; the
    transformer never moves. On this CPU-only machine both places are the CPU: the moves are seen, their effect
    on GPU memory is not."""
    plain = _ours(_renderer(tiny_flux_schnell), 2, 0.0, [4])[0]
    r = _renderer(tiny_flux_schnell, offload_text_encoders=True)
    moves: list[tuple[int, str]] = []
    for i, enc in enumerate(r.backend.encoders):
        def to(*args, _i=i, _to=enc.to, **kwargs):
            moves.append((_i, str(args[0])))
            return _to(*args, **kwargs)
        enc.to = to
    image = _ours(r, 2, 0.0, [4])[0]
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]  # there (device), back (home): each encoder
    assert r.backend.encoder_home == torch.device("cpu") and np.array_equal(image, plain)
    moves.clear()
    _ours(r, 2, 0.0, [5])  # the prompt is cached: no encoder is needed, none moves
    assert moves == []


def test_weights_that_cannot_fit_get_what_would_make_them_fit(tiny_flux_dev):
    from movielm_fast.engine.models import fit_problem, weights_bytes

    model = load_model(str(tiny_flux_dev))
    assert weights_bytes(tiny_flux_dev / "transformer", 4) == 4 * sum(p.numel() for p in model.transformer.parameters())
    parts = {k: weights_bytes(tiny_flux_dev / k, 2) for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    encoders = parts["text_encoder"] + parts["text_encoder_2"]
    total = sum(parts.values())
    assert fit_problem("flux", "bfloat16", parts, total, offload=False) is None
    error = fit_problem("flux", "bfloat16", parts, total - 1, offload=False)
    assert error.message.startswith("flux needs about") and "for its weights in bfloat16" in error.message
    assert "--offload-text-encoders" in error.hint and "FP8 weights" in error.hint
    assert fit_problem("flux", "bfloat16", parts, total - encoders, offload=True) is None  # offloaded: they fit
