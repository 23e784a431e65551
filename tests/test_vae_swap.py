"""VAE swap: another AutoencoderKL (e.g. the fp16-fix SDXL VAE) or an AutoencoderTiny (TAESD) decodes instead of
the model's own VAE. Oracle: diffusers' pipeline with the same VAE passed in (`vae=...`)."""

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
from movielm_fast.testing import build_tiny_autoencoder_tiny
from tests.helpers import cli_json, movie, write_plan

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


def _kl(seed: int, latent_channels: int = 4, force_upcast: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3,
                         latent_channels=latent_channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=8, sample_size=256, force_upcast=force_upcast, scaling_factor=0.13025)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    build_tiny_autoencoder_tiny(seed=3).save_pretrained(root / "taesd")
    _kl(4).save_pretrained(root / "kl-fp16-fix")
    _kl(5, latent_channels=16).save_pretrained(root / "kl-16ch")
    return root


def _diffusers(cls, model_path, vae, steps=3, seed=9):
    pipe = cls.from_pretrained(model_path, vae=vae, local_files_only=True)
    pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=6.0, num_inference_steps=steps, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (out * 255).round().astype(np.int16)


def _ours(renderer, vae_path, steps=3, seed=9):
    s = BatchSettings(64, 64, steps, 6.0, "euler", vae=str(vae_path) if vae_path else None)
    return renderer.render([FrameJob("m", "f", PROMPT, NEGATIVE, seed)], s)[0][0].astype(np.int16)


@pytest.mark.parametrize("kind,name", [("sd", "taesd"), ("sdxl", "kl-fp16-fix"), ("sdxl", "taesd")])
def test_swapped_vae_matches_diffusers(request, vaes, kind, name):
    from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline

    model = request.getfixturevalue("tiny_sd" if kind == "sd" else "tiny_sdxl")
    vae = (AutoencoderTiny if name == "taesd" else AutoencoderKL).from_pretrained(vaes / name)
    r = Renderer(ModelConfig(model=str(model)))
    ours = _ours(r, vaes / name)
    ref = _diffusers(StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline, model, vae)
    assert np.abs(ours - ref).max() <= 2
    assert np.abs(ours - _ours(r, None)).max() > 2  # the swapped VAE is what decoded
    assert ours.std() > 1


def test_fp16_fix_vae_decodes_in_fp16(tiny_sdxl, vaes):
    """The SDXL VAE says force_upcast (it overflows in fp16) and stays fp32; the fp16-fix VAE says it does not."""
    from movielm_fast.engine.models import load_model, load_vae
    from movielm_fast.export.specs import VAE_DECODER, component_dtype

    assert component_dtype(load_model(tiny_sdxl), VAE_DECODER, "fp16") == "fp32"
    assert component_dtype(load_vae(vaes / "kl-fp16-fix"), VAE_DECODER, "fp16") == "fp16"
    assert component_dtype(load_vae(vaes / "taesd"), VAE_DECODER, "fp16") == "fp16"


def test_onnxruntime_swapped_vae_matches_torch(tiny_sd, vaes):
    pytest.importorskip("onnxruntime")
    ours = _ours(Renderer(ModelConfig(model=str(tiny_sd))), vaes / "taesd")
    ort = Renderer(ModelConfig(model=str(tiny_sd), backend="onnxruntime"))
    assert np.abs(_ours(ort, vaes / "taesd") - ours).max() <= 2
    decoder = ort.parts["vae", str(vaes / "taesd")].backend
    assert list(decoder.graphs) == ["vae_decoder"]  # its own export: nothing of the model is exported again


def test_manifest_and_resume_key_include_the_vae(tmp_path, tiny_sd, vaes):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 2)], defaults={"width": 64, "height": 64, "steps": 2})
    out = tmp_path / "out"
    base = ["render", str(plan), "--model", str(tiny_sd), "--out", str(out), "--no-style-training", "--json"]

    def run(*extra):
        return cli_json(base + list(extra))

    assert run("--vae", str(vaes / "taesd"))["rendered"] == 2
    entry = json.loads((out / "m" / "manifest.json").read_text())["frames"][0]
    assert entry["vae"]["id"] == "taesd" and len(entry["vae"]["hash"]) == 16
    assert run("--vae", str(vaes / "taesd"))["skipped"] == 2
    assert run("--vae", str(vaes / "kl-fp16-fix"))["rendered"] == 2
    assert run()["rendered"] == 2  # back to the model's own VAE
    assert "vae" not in json.loads((out / "m" / "manifest.json").read_text())["frames"][0]


def test_plan_vae_relative_to_plan(tmp_path, tiny_sd, vaes):
    import shutil

    shutil.copytree(vaes / "taesd", tmp_path / "v" / "taesd")
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1, render={"vae": "v/taesd"})],
                      defaults={"width": 64, "height": 64, "steps": 2})
    res = CliRunner().invoke(cli, ["render", str(plan), "--model", str(tiny_sd), "--out", str(tmp_path / "out"),
                                   "--no-style-training", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "m" / "manifest.json").read_text())["frames"][0]["vae"]["id"] == "taesd"


def test_bad_vaes_are_user_errors(tmp_path, tiny_sd, vaes):
    plan = write_plan(tmp_path / "plan.json", [movie("m", 1)], defaults={"width": 64, "height": 64, "steps": 2})
    bad_plan = write_plan(tmp_path / "bad.json", [movie("b", 1, render={"vae": "nowhere"})])
    cases = [("--vae", str(tmp_path / "missing"), plan, "not a folder"),
             ("--vae", str(tiny_sd / "unet"), plan, "not a VAE"),
             ("--vae", str(vaes / "kl-16ch"), plan, "16-channel"),
             (None, None, bad_plan, "render.vae")]
    for flag, value, p, words in cases:
        args = ["render", str(p), "--model", str(tiny_sd), "--out", str(tmp_path / "out"), "--no-style-training",
                "--quiet"] + ([flag, value] if flag else [])
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0
        assert words in res.output, res.output
        assert "Traceback" not in res.output


def test_model_folder_vae_subfolder_is_accepted(tiny_sd):
    from movielm_fast.engine.models import vae_folder

    folder, cls_name = vae_folder(tiny_sd)
    assert folder == tiny_sd / "vae" and cls_name == "AutoencoderKL"


def test_swapped_vae_export_spec(vaes):
    """A swapped VAE is a bundle with only a decoder: one spec, one graph, TensorRT profiles from the same spec."""
    from movielm_fast.engine.models import load_vae
    from movielm_fast.export.graphs import graph_modules
    from movielm_fast.export.specs import default_profile, model_specs

    bundle = load_vae(vaes / "taesd")
    specs = model_specs(bundle)
    assert list(specs) == ["vae_decoder"] and list(graph_modules(bundle)) == ["vae_decoder"]
    spec = specs["vae_decoder"]
    dims = spec.dims(frames=2, width=64, height=64)
    with torch.no_grad():
        images = graph_modules(bundle)["vae_decoder"](spec.sample_inputs(dims)["latents"])
    assert tuple(images.shape) == spec.shapes(dims, "outputs")["images"] == (2, 3, 64, 64)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert spec.input_profiles(default_profile(bundle))["latents"][0] == (1, 4, 64, 64)


def test_export_command_exports_a_swapped_vae(tmp_path, tiny_sd, vaes):
    pytest.importorskip("onnxruntime")
    res = CliRunner().invoke(cli, ["export", "--model", str(tiny_sd), "--vae", str(vaes / "taesd"), "--json"])
    assert res.exit_code == 0, res.output
    arts = json.loads(res.output[res.output.index("{"):])
    assert arts["vae:vae_decoder"]["model_id"] == "taesd"
    assert arts["vae:vae_decoder"]["model_hash"] != arts["vae_decoder"]["model_hash"]
    bad = CliRunner().invoke(cli, ["export", "--model", str(tiny_sd), "--refiner", str(tiny_sd)])
    assert bad.exit_code != 0 and "not an SDXL refiner" in bad.output and "Traceback" not in bad.output
