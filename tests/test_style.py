"""Style immobilization on tiny random-weight models: learning, frozen weights, file format (our loader and
diffusers'), the style library, bad inputs, reproducibility, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model
from movielm_fast.errors import UserError
from movielm_fast.plan import Style
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import render
from movielm_fast.run.renderer import Renderer
from movielm_fast.style.immobilize import immobilize_style
from movielm_fast.style.library import list_styles
from movielm_fast.style.training import StyleSettings, _draw
from tests.helpers import movie, write_plan

STYLE = Style(name="Gothic", description="((Victorian elegance)), soft sepia")
FAST = StyleSettings(steps=3, batch_size=2, eval_samples=2)


def _write_images(folder, sizes=((64, 64), (96, 64), (64, 80), (128, 128))):
    """A fixed set of 'sepia stripes' images in mixed sizes (w, h): one shared look, different layouts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        stripes = 0.5 + 0.5 * np.sin((x * (i + 1) + y * (3 - i)) / 6.0)
        base = np.stack([stripes * 200 + 40, stripes * 150 + 30, stripes * 90 + 20], -1)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"))
    return folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd_renderer(tiny_sd):
    return Renderer(ModelConfig(model=str(tiny_sd)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("style-images"))


@pytest.fixture(scope="module")
def trained_sd(sd_renderer, images, tmp_path_factory):
    """One real (short) training run on the fixed images, with snapshots of everything that must stay frozen."""
    model = sd_renderer.model
    before = [{k: v.clone() for k, v in enc.state_dict().items()} for enc in model.text_encoders]
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    vocab_before = [len(t) for t in model.tokenizers]
    out = tmp_path_factory.mktemp("library")
    result = immobilize_style(sd_renderer.scene_renderer, STYLE, StyleSettings(eval_samples=64), images=images, out=out)
    return result, before, unet_before, vocab_before, out


def test_loss_goes_down_and_only_the_new_token_changes(sd_renderer, trained_sd):
    result, before, unet_before, vocab_before, _ = trained_sd
    rep = result.report
    assert not result.cache_hit and result.path.is_file() and result.token == "<gothic>"
    # The loss on a fixed evaluation set (the same 64 draws of image, noise and timestep before and after) is the
    # measure: the training loss mostly varies with the random timesteps. A random-weight model listens to its
    # text only a little, so the gain is small (~0.3%), but it is a paired comparison on identical draws.
    assert rep["eval_loss_after"] < rep["eval_loss_before"] * 0.999, rep
    model = sd_renderer.model
    for enc, snap in zip(model.text_encoders, before):
        after = enc.state_dict()
        assert after.keys() == snap.keys()
        assert all(torch.equal(after[k], snap[k]) for k in snap)  # bit-identical, table included
    assert all(torch.equal(v, unet_before[k]) for k, v in model.unet.state_dict().items())
    assert [len(t) for t in model.tokenizers] == vocab_before  # the shared tokenizer gained no token
    assert all(p.requires_grad for p in model.unet.parameters())  # flags restored after training
    # The new row did move away from its initial word ("gothic").
    vec = vectors_for_model(load_embedding(result.path), "sd")[0]
    tok = model.tokenizers[0]
    init = model.text_encoders[0].get_input_embeddings().weight[tok("gothic", add_special_tokens=False).input_ids[0]]
    assert vec.shape == (1, 32) and not torch.allclose(vec[0], init.float(), atol=1e-4)
    assert result.meta["init_word"] == "gothic"
    assert rep["seconds_per_step"] > 0 and rep["images"] == 4


def test_substituted_lookup_matches_a_resized_text_encoder(sd_renderer):
    """The fast path (frozen table, the new row substituted into inputs_embeds) against the classic one (resize the
    encoder's embedding table, write the row, run it on input ids): same hidden states, same gradient."""
    import copy

    from movielm_fast.style.training import Frozen, Trainer

    model = sd_renderer.model
    s = StyleSettings().resolve(model)
    vec = torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    with Frozen(model):
        trainer = Trainer(model, torch.device("cpu"), s, [vec])
        (ids, eos), = trainer.caption_ids("a castle in the style of {}, at night")
        hidden, _ = trainer.encode_text([ids[None]], [torch.tensor([eos])])
        hidden.square().mean().backward()
    ours_grad = trainer.vectors[0].grad[0]

    classic = copy.deepcopy(model.text_encoders[0])
    v = classic.get_input_embeddings().weight.shape[0]
    classic.resize_token_embeddings(v + 1)
    table = classic.get_input_embeddings().weight
    with torch.no_grad():
        table[v] = vec[0]
    ref = classic(input_ids=ids[None]).last_hidden_state
    ref.square().mean().backward()
    assert int((ids == v).sum()) == 1
    torch.testing.assert_close(hidden, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_grad, table.grad[v], atol=1e-9, rtol=1e-4)
    assert ours_grad.abs().max() > 0


def test_mixed_sizes_are_fitted_and_reported(trained_sd):
    result = trained_sd[0]
    notes = " ".join(result.report["notes"])
    assert "4 size(s)" in notes and "centre-cropped to 64x64" in notes


def test_diffusers_loads_the_file_and_encodes_like_us(tiny_sd, sd_renderer, trained_sd):
    from diffusers import StableDiffusionPipeline

    path, token = trained_sd[0].path, trained_sd[0].token
    prompt = f"{token}, a castle on a hill at night"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.load_textual_inversion(str(path))  # the token comes from the file, as for any diffusers embedding
    ref = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    r = Renderer(ModelConfig(model=str(tiny_sd)))  # fresh tokenizers: binding a token changes them
    r.encoder.add_token(token, vectors_for_model(load_embedding(path), "sd"), str(path))
    ours = r.encoder.encode(prompt).hidden
    assert ours.shape == ref.shape == (1, 77, 32)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)
    # The token matters: without it the prompt encodes differently.
    plain = r.encoder.encode("gothic, a castle on a hill at night").hidden
    assert (plain - ours).abs().max() > 1e-3


def test_sdxl_generated_scenes_both_encoders_and_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    before = [{k: v.clone() for k, v in enc.state_dict().items()} for enc in r.model.text_encoders]
    s = StyleSettings(steps=4, scenes=2, batch_size=2, scene_steps=2, eval_samples=2)
    result = immobilize_style(r.scene_renderer, STYLE, s, out=tmp_path)
    assert result.report["images"] == 2 and result.meta["source"].startswith("generated")
    for enc, snap in zip(r.model.text_encoders, before):
        assert all(torch.equal(v, snap[k]) for k, v in enc.state_dict().items())
    data = load_file(str(result.path))
    assert set(data) == {"clip_l", "clip_g"} and data["clip_l"].shape == (1, 32) and data["clip_g"].shape == (1, 32)

    token = result.token
    prompt = f"{token}, a harbour with boats"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.load_textual_inversion(data["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(data["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ref_hidden, _, ref_pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
    fresh = Renderer(ModelConfig(model=str(tiny_sdxl)))
    fresh.encoder.add_token(token, vectors_for_model(load_embedding(result.path), "sdxl"), str(result.path))
    ours = fresh.encoder.encode(prompt)
    torch.testing.assert_close(ours.hidden, ref_hidden.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled, ref_pooled.float(), atol=1e-5, rtol=1e-5)


def test_library_hit_and_miss(sd_renderer, images, trained_sd):
    result, *_, out = trained_sd
    # eval size: not in key
    again = immobilize_style(sd_renderer.scene_renderer, STYLE, StyleSettings(), images=images, out=out)
    assert again.cache_hit and again.path == result.path and again.token == result.token
    other = Style(name="Gothic", description="cold blue moonlight")
    miss = immobilize_style(sd_renderer.scene_renderer, other, FAST, images=images, out=out)
    assert not miss.cache_hit and miss.path != result.path and miss.key != result.key
    index = json.loads((out / "index.json").read_text())
    assert {e["description"] for e in index["styles"]} == {STYLE.description, other.description}
    assert len(list_styles(out)) == 2
    # A hit hands back the library file's vectors, ready to bind in memory.
    stored = vectors_for_model(load_embedding(result.path), "sd")
    assert again.token == "<gothic>" and torch.equal(again.vectors[0], stored[0])


def test_two_styles_with_one_token_name_both_render(tmp_path, tiny_sd):
    """Two different styles both named Gothic learn the same token name <gothic>: the driver binds the second
    under a name derived from its library entry, so each movie renders with its own vector. (A tiny model: the demo
    model says style training cannot help it and skips it, issue 28.)"""
    plan = write_plan(tmp_path / "plan.json", [
        movie("warm", 1, style={"name": "Gothic", "description": "soft sepia"}),
        movie("cold", 1, style={"name": "Gothic", "description": "cold blue moonlight"})],
        {"width": 64, "height": 64, "steps": 2, "seed": 3})
    summary = render(RunConfig(out=tmp_path / "out", style_training=True), [plan], model=ModelConfig(model=str(tiny_sd)))
    assert summary.frames_rendered == 2 and summary.failures == []
    prompts = {m: json.loads((tmp_path / "out" / m / "manifest.json").read_text())["frames"][0]["prompt"]
               for m in ("warm", "cold")}
    assert prompts["warm"].startswith("<gothic>, ")
    assert prompts["cold"].startswith("<gothic-") and not prompts["cold"].startswith("<gothic>")


def test_reproducible_and_micro_batches_give_the_same_vector(sd_renderer, images, tmp_path):
    s = StyleSettings(steps=3, batch_size=4, eval_samples=2)
    a = immobilize_style(sd_renderer.scene_renderer, STYLE, s, images=images, out=tmp_path / "a")
    b = immobilize_style(sd_renderer.scene_renderer, STYLE, s, images=images, out=tmp_path / "b")
    # micro_batch is how an out-of-memory retry splits the batch; it must not change what is learned.
    c = immobilize_style(sd_renderer.scene_renderer, STYLE, replace(s, micro_batch=1), images=images,
                         out=tmp_path / "c")
    va, vb, vc = (load_embedding(x.path).vectors["single"] for x in (a, b, c))
    assert torch.equal(va, vb)
    assert a.key == c.key and c.report["micro_batch"] == 1
    torch.testing.assert_close(va, vc, atol=1e-5, rtol=1e-4)


def test_interrupted_training_leaves_nothing_in_the_library(sd_renderer, images, tmp_path):
    def stop(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        immobilize_style(sd_renderer.scene_renderer, STYLE, FAST, images=images, out=tmp_path, on_step=stop)
    assert list_styles(tmp_path) == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no embedding, no temp file, no meta
    done = immobilize_style(sd_renderer.scene_renderer, STYLE, FAST, images=images, out=tmp_path)  # a clean restart
    assert not done.cache_hit and len(list_styles(tmp_path)) == 1


def test_bad_inputs(sd_renderer, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images in") as exc:
        immobilize_style(sd_renderer.scene_renderer, STYLE, FAST, images=empty, out=tmp_path / "lib")
    assert exc.value.hint
    with pytest.raises(UserError, match="image folder not found"):
        immobilize_style(sd_renderer.scene_renderer, STYLE, FAST, images=tmp_path / "missing", out=tmp_path / "lib")
    broken = _write_images(tmp_path / "broken", sizes=((64, 64),))
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match="cannot read image .*bad.png"):
        immobilize_style(sd_renderer.scene_renderer, STYLE, FAST, images=broken, out=tmp_path / "lib")
    with pytest.raises(UserError, match="already a word"):
        immobilize_style(sd_renderer.scene_renderer, Style(name="Castle", token="castle"), FAST, images=broken,
                         out=tmp_path)
    with pytest.raises(UserError, match="no letters or digits"):
        immobilize_style(sd_renderer.scene_renderer, Style(name="???"), FAST, out=tmp_path)
    with pytest.raises(UserError, match="multiple of 8"):
        immobilize_style(sd_renderer.scene_renderer, STYLE, StyleSettings(resolution=100), out=tmp_path)
    assert not (tmp_path / "lib").exists()  # every check runs before anything is written


def test_cli_train_and_list(tiny_sd, images, tmp_path):
    from movielm_fast.cli.style_cmds import style_group

    runner = CliRunner()
    args = ["train", "--model", str(tiny_sd), "--name", "Noir", "--description", "hard shadows",
            "--images", str(images), "--steps", "2", "--batch-size", "2", "--out", str(tmp_path), "--json"]
    res = runner.invoke(style_group, args)
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["token"] == "<noir>" and not info["cache_hit"] and info["report"]["steps"] == 2
    res = runner.invoke(style_group, args[:-1])  # the same style again, human-readable output
    assert res.exit_code == 0 and "already in the library -> <noir>" in res.stdout
    res = runner.invoke(style_group, ["list", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "Noir" in res.output and "<noir>" in res.output
    res = runner.invoke(style_group, ["train", "--model", str(tiny_sd), "--name", "Noir", "--images",
                                      str(tmp_path / "nothing"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "image folder not found" in res.output


def test_caption_files_say_what_user_images_show(tmp_path):
    from movielm_fast.style.images import load_images
    folder = tmp_path / "imgs"
    _write_images(folder, sizes=((64, 64), (64, 64)))
    names = sorted(p.stem for p in folder.glob("*.png"))
    _, _, plain_digest = load_images(folder, 64)
    (folder / f"{names[0]}.txt").write_text("  a red circle\non grass \n")
    images, _, digest = load_images(folder, 64)
    assert [im.caption_subject for im in images] == ["a red circle on grass", None]
    assert digest != plain_digest  # another caption is another training set: the token is learned again
    (folder / f"{names[0]}.txt").unlink()
    assert load_images(folder, 64)[2] == plain_digest  # folders without captions keep their digest


def test_flux_token_trains_by_flow_matching_and_loads_in_diffusers(tiny_flux_dev, images, tmp_path):
    """FLUX.1: one vector per text encoder (CLIP, T5), learned through the frozen transformer with the flow-matching
    loss; the file is diffusers' (one tensor per encoder), and the prompt with the token encodes in diffusers'
    FluxPipeline as in ours."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    r = Renderer(ModelConfig(model=str(tiny_flux_dev)))
    model = r.model
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    result = immobilize_style(r.scene_renderer, STYLE, StyleSettings(eval_samples=32, steps=20), images=images,
                              out=tmp_path / "library")
    rep = result.report
    assert rep["eval_loss_after"] < rep["eval_loss_before"] * 0.999, rep  # paired draws (see the SD test)
    assert all(torch.equal(v, before[k]) for k, v in model.transformer.state_dict().items())
    state = load_file(str(result.path))
    assert set(state) == {"clip_l", "t5"} and state["clip_l"].shape == state["t5"].shape == (1, 32)
    t5_init = model.text_encoders[1].get_input_embeddings().weight[
        model.tokenizers[1]("gothic", add_special_tokens=False).input_ids].float().mean(0)
    assert not torch.allclose(state["t5"][0], t5_init, atol=1e-4)  # the T5 vector moved too

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev, local_files_only=True)
    token = result.token
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["t5"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = f"{token}, a lighthouse at night"
    ref, ref_pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=torch.device("cpu"))
    r.encoder.add_token(token, list(result.vectors), str(result.path))
    ours = r.encoder.encode(prompt)
    assert torch.allclose(ours.hidden, ref, atol=1e-4) and torch.allclose(ours.pooled, ref_pooled, atol=1e-5)


def test_min_noise_trains_only_the_noisier_levels_and_keeps_old_keys(sd_renderer):
    """min_noise draws timesteps from its share of the schedule up; at 0 the draws and the library key are as they
    were before the setting existed."""
    args = (torch.arange(64) % 2, (4, 8, 8), 1000, [1, 1])
    noisy = _draw(torch.Generator().manual_seed(0), *args, t_min=500)
    assert noisy.t.min() >= 500 and noisy.t.max() < 1000 and noisy.t.float().std() > 100
    every = _draw(torch.Generator().manual_seed(0), *args)
    assert every.t.min() < 100 and torch.equal(every.t, _draw(torch.Generator().manual_seed(0), *args, t_min=0).t)
    assert "min_noise" not in StyleSettings().key_dict()
    assert StyleSettings(min_noise=0.5).key_dict()["min_noise"] == 0.5
    with pytest.raises(UserError, match="min_noise is 1.0") as exc:
        StyleSettings(min_noise=1.0).resolve(sd_renderer.model)
    assert "up to, not including, 1" in exc.value.hint
