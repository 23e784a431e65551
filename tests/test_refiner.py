"""The SDXL refiner (ensemble of experts): the base denoises the first `refiner_switch` of the schedule, the refiner
the rest. The oracle is diffusers' StableDiffusionXLPipeline(denoising_end=F, output_type="latent") followed by
StableDiffusionXLImg2ImgPipeline(denoising_start=F, image=latents), with the same components and seed."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from movielm_fast.cli.main import cli
from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.pipeline import switch_index
from movielm_fast.engine.schedulers import make_scheduler
from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings
from movielm_fast.run.renderer import Renderer
from tests.helpers import SpyBackend, movie, write_plan

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory):
    from movielm_fast.testing import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-refiner")
    build_tiny_pipeline("sdxl_refiner").save_pretrained(path, safe_serialization=True)
    return path


def _diffusers(base_path, refiner_path, scheduler, steps, guidance, switch, seed, negative=NEGATIVE):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(base_path, local_files_only=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_path, local_files_only=True)
    for pipe in (base, refiner):
        pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = base(PROMPT, negative_prompt=negative or None, guidance_scale=guidance, num_inference_steps=steps,
                   height=64, width=64, denoising_end=switch, output_type="latent", generator=g).images
    out = refiner(PROMPT, negative_prompt=negative or None, guidance_scale=guidance, num_inference_steps=steps,
                  denoising_start=switch, image=latents, generator=g, output_type="np").images[0]
    return (out * 255).round().astype(np.int16)


def _settings(refiner, scheduler="euler", steps=6, guidance=5.0, switch=0.8):
    return BatchSettings(64, 64, steps, guidance, scheduler, refiner=str(refiner), refiner_switch=switch)


@pytest.mark.parametrize("scheduler,guidance,switch", [("euler", 5.0, 0.8), ("dpmpp", 1.0, 0.5)])
def test_refiner_matches_diffusers(tiny_sdxl, tiny_refiner, scheduler, guidance, switch):
    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    ours = r.render([FrameJob("m", "f", PROMPT, NEGATIVE, 11)],
                    _settings(tiny_refiner, scheduler, 6, guidance, switch))[0][0].astype(np.int16)
    ref = _diffusers(tiny_sdxl, tiny_refiner, scheduler, 6, guidance, switch, seed=11)
    assert np.abs(ours - ref).max() <= 2
    plain = r.render([FrameJob("m", "f", PROMPT, NEGATIVE, 11)],
                     BatchSettings(64, 64, 6, guidance, scheduler))[0][0].astype(np.int16)
    assert np.abs(ours - plain).max() > 2  # the refiner did change the image


class Recording(SpyBackend):
    """A backend wrapper recording what every UNet call is given."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = []

    def seen(self, latents, t, cond):
        self.calls.append((float(t), cond.time_ids.clone(), cond.text_embeds.clone(), cond.encoder_hidden_states))


def test_refiner_unet_inputs_equal_diffusers(tiny_sdxl, tiny_refiner):
    """The tiny UNets barely react to the aesthetic score, so the images alone could not catch a wrong one: compare
    what each UNet call is given -- timesteps, time ids (aesthetic 6.0, negatives 2.5), pooled and token states."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    expert = r._part("refiner", str(tiny_refiner))
    base_rec, ref_rec = Recording(r.backend), Recording(expert.backend)
    r.backend, expert.backend = base_rec, ref_rec
    r.render([FrameJob("m", "f", PROMPT, NEGATIVE, 11)], _settings(tiny_refiner, "euler", 10, 5.0, 0.75))

    seen = {"base": [], "refiner": []}
    pipes = {"base": StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True),
             "refiner": StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner, local_files_only=True)}
    for name, pipe in pipes.items():
        pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.register_forward_pre_hook(
            lambda mod, args, kw, name=name: seen[name].append(
                (float(args[1]), kw["added_cond_kwargs"]["time_ids"], kw["added_cond_kwargs"]["text_embeds"],
                 kw["encoder_hidden_states"])), with_kwargs=True)
    g = torch.Generator("cpu").manual_seed(11)
    latents = pipes["base"](PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=10, height=64,
                            width=64, denoising_end=0.75, output_type="latent", generator=g).images
    pipes["refiner"](PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=10,
                     denoising_start=0.75, image=latents, generator=g, output_type="latent")
    for ours, theirs in ((base_rec.calls, seen["base"]), (ref_rec.calls, seen["refiner"])):
        assert [c[0] for c in ours] == [c[0] for c in theirs]
        for (_, ids, pooled, hidden), (_, t_ids, t_pooled, t_hidden) in zip(ours, theirs):
            assert torch.equal(ids.float(), t_ids.float())
            assert torch.allclose(pooled, t_pooled, atol=1e-5) and torch.allclose(hidden, t_hidden, atol=1e-5)
    assert len(ref_rec.calls) == 3 and len(base_rec.calls) == 7
    assert ref_rec.calls[0][1].tolist() == [[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]]


def test_switch_splits_the_schedule_like_diffusers():
    """Base and refiner steps partition the schedule: every timestep is denoised exactly once."""
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": "leading"}
    for name in ("euler", "dpmpp", "ddim"):
        for switch in (0.5, 0.8, 0.9):
            s = make_scheduler(name, config)
            s.set_timesteps(40)
            n_base, start = switch_index(s, switch, base=True), switch_index(s, switch, base=False)
            assert n_base == start and 0 < n_base < 40
            assert all(t >= round(1000 * (1 - switch)) for t in s.timesteps[:n_base])
    s = make_scheduler("euler", config)
    s.set_timesteps(40)
    assert switch_index(s, 0.8, base=True) == 32  # "about 40 steps, the last quarter... fifth on the refiner"


def test_refiner_batches_like_the_base(tiny_sdxl, tiny_refiner):
    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    jobs = [FrameJob("m", "a", PROMPT, NEGATIVE, 1), FrameJob("m", "b", "a red door", "", 2)]
    s = _settings(tiny_refiner, steps=4)
    together = r.render(jobs, s)[0].numpy().astype(np.int16)
    alone = np.stack([r.render([j], s)[0][0] for j in jobs]).astype(np.int16)
    assert np.abs(together - alone).max() <= 1


def test_onnxruntime_refiner_matches_torch(tiny_sdxl, tiny_refiner):
    pytest.importorskip("onnxruntime")
    job = FrameJob("m", "f", PROMPT, NEGATIVE, 5)
    s = _settings(tiny_refiner, steps=4)
    torch_img = Renderer(ModelConfig(model=str(tiny_sdxl))).render([job], s)[0][0].astype(np.int16)
    ort = Renderer(ModelConfig(model=str(tiny_sdxl), backend="onnxruntime"))
    ort_img = ort.render([job], s)[0][0].astype(np.int16)
    assert np.abs(torch_img - ort_img).max() <= 2
    from movielm_fast.export.onnx_export import META_MODEL_HASH

    expert = ort.parts["refiner", str(tiny_refiner)]
    unet = expert.backend.graphs["unet"]
    assert unet.session.get_modelmeta().custom_metadata_map[META_MODEL_HASH] == expert.model.content_hash
    assert [i.shape[1] for i in unet.session.get_inputs() if i.name == "time_ids"] == [5]  # its own spec


def test_manifest_records_the_refiner_and_resume_key(tmp_path, tiny_sdxl, tiny_refiner):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 2)],
                      defaults={"width": 64, "height": 64, "steps": 3, "scheduler": "euler"})
    out = tmp_path / "out"
    args = ["render", str(plan), "--model", str(tiny_sdxl), "--out", str(out), "--no-style-training", "--quiet",
            "--refiner", str(tiny_refiner), "--refiner-switch", "0.6"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "m" / "manifest.json").read_text())
    entry = manifest["frames"][0]
    assert entry["refiner"]["id"] == tiny_refiner.name and entry["refiner"]["switch"] == 0.6
    assert len(entry["refiner"]["hash"]) == 16
    assert manifest["settings"]["refiner"] == str(tiny_refiner.resolve())
    again = CliRunner().invoke(cli, args + ["--json"])
    assert json.loads(again.output.strip().splitlines()[-1])["skipped"] == 2
    other = CliRunner().invoke(cli, args[:-1] + ["0.7", "--json"])  # another switch: another image
    assert json.loads(other.output.strip().splitlines()[-1])["rendered"] == 2


def test_plan_refiner_relative_to_plan(tmp_path, tiny_sdxl, tiny_refiner):
    import shutil

    shutil.copytree(tiny_refiner, tmp_path / "models" / "ref")
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1, render={"refiner": "models/ref",
                                                                      "refiner_switch": 0.7})],
                      defaults={"width": 64, "height": 64, "steps": 2, "scheduler": "euler"})
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["render", str(plan), "--model", str(tiny_sdxl), "--out", str(out),
                                   "--no-style-training", "--quiet"])
    assert res.exit_code == 0, res.output
    entry = json.loads((out / "m" / "manifest.json").read_text())["frames"][0]
    assert entry["refiner"]["switch"] == 0.7


def _render_cli(tmp_path, model, *extra, plan_movie=None):
    plan = write_plan(tmp_path / "plan.json", [plan_movie or movie("m", 1)],
                      defaults={"width": 64, "height": 64, "steps": 2})
    return CliRunner().invoke(cli, ["render", str(plan), "--model", str(model), "--out", str(tmp_path / "out"),
                                    "--no-style-training", "--quiet", *extra])


def test_bad_refiners_are_user_errors(tmp_path, tiny_sd, tiny_sdxl, tiny_refiner):
    cases = [
        (_render_cli(tmp_path, tiny_sdxl, "--refiner", str(tmp_path / "nope")), "not a folder"),
        (_render_cli(tmp_path, tiny_sdxl, "--refiner", str(tiny_sdxl)), "SDXL base model"),
        (_render_cli(tmp_path, tiny_sd, "--refiner", str(tiny_refiner)), "is for SDXL"),
        (_render_cli(tmp_path, tiny_refiner), "--refiner"),  # a refiner as --model
        (_render_cli(tmp_path, tiny_sdxl, plan_movie=movie("m", 1, render={"refiner": "missing"})),
         "render.refiner"),
    ]
    for res, words in cases:
        assert res.exit_code != 0
        assert words in res.output, res.output
        assert "Traceback" not in res.output and not isinstance(res.exception, (TypeError, AttributeError))


def test_refiner_setting_is_validated():
    with pytest.raises(ValueError):
        RenderSettings(refiner_switch=1.0)
    with pytest.raises(UserError, match="not a refiner|no readable"):
        from movielm_fast.engine.models import check_refiner

        check_refiner(".")


def test_style_tokens_reach_the_refiner_encoder(tiny_sdxl, tiny_refiner):
    """A style token is bound to the refiner's one text encoder (SDXL's second) with the second encoder's vectors,
    whether the refiner is loaded before or after the token is bound."""
    from movielm_fast.run.tasks import StyleToken

    r = Renderer(ModelConfig(model=str(tiny_sdxl)))
    token = StyleToken("<gothic-x>", (torch.randn(1, 32), torch.randn(1, 32) * 0.05), "test-source")
    r.bind([token])
    expert = r._part("refiner", str(tiny_refiner))
    assert "<gothic-x>" in expert.encoder.token_sources
    table = expert.encoder.tables[0]
    tid = expert.encoder.tokenizers[0].convert_tokens_to_ids("<gothic-x>")
    assert torch.equal(table[tid], token.vectors[1][0])
    s = _settings(tiny_refiner, steps=3)
    with_token = r.render([FrameJob("m", "f", "<gothic-x> a castle", "", 3)], s)[0][0].astype(np.int16)
    without = r.render([FrameJob("m", "f", "a castle", "", 3)], s)[0][0].astype(np.int16)
    assert np.abs(with_token - without).max() > 0


def test_refiner_export_spec(tiny_refiner):
    """The refiner bundle exports a text encoder and a UNet with 5 time ids, and no VAE (the base model decodes);
    TensorRT profiles are computed from the same spec."""
    from movielm_fast.engine.models import load_refiner
    from movielm_fast.export.graphs import graph_modules
    from movielm_fast.export.specs import default_profile, model_specs

    bundle = load_refiner(tiny_refiner)
    specs = model_specs(bundle)
    assert list(specs) == ["text_encoder", "unet"] and list(graph_modules(bundle)) == list(specs)
    unet = specs["unet"]
    assert dict((t.name, t.shape) for t in unet.inputs)["time_ids"] == ("B", 5)
    assert unet.consts["pooled"] == 32 and unet.consts["time_ids"] == 5
    dims = unet.dims(frames=1, width=64, height=64)
    inputs = unet.sample_inputs(dims)
    with torch.no_grad():
        out = graph_modules(bundle)["unet"](*(inputs[n] for n in unet.input_names))
    assert tuple(out.shape) == unet.shapes(dims, "outputs")["noise"]
    assert unet.input_profiles(default_profile(bundle))["time_ids"][2] == (8, 5)
