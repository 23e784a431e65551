"""ModelSpec, shape profiles, cache keys and the TensorRT build recipe: everything that needs no GPU or TensorRT."""

import json
from hashlib import sha256 as _sha256

import pytest

from movielm_fast.engine.models import load_model
from movielm_fast.errors import UserError
from movielm_fast.export import cache
from movielm_fast.export.specs import ShapeProfile, model_specs, parse_batch_sizes, parse_sizes


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return load_model(tiny_sd)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_model(tiny_sdxl)


def test_specs_declare_every_component(sd, sdxl):
    assert list(model_specs(sd)) == ["text_encoder", "unet", "vae_decoder"]
    specs = model_specs(sdxl)
    assert list(specs) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert specs["text_encoder"].input_names == ["inputs_embeds", "eos_index"]
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    # SDXL's pooled embedding comes from the projected second encoder (projection_dim 32 in the tiny model).
    assert specs["unet"].consts["pooled"] == specs["text_encoder_2"].consts["pooled"] == 32
    assert specs["unet"].dynamic_axes()["sample"] == {0: "B", 2: "h", 3: "w"}


def test_dims_and_output_shapes(sd):
    spec = model_specs(sd)["unet"]
    dims = spec.dims(frames=3, width=768, height=512, chunks=2, cfg=True)
    assert dims["B"] == 6 and dims["S"] == 154 and (dims["h"], dims["w"]) == (64, 96)
    assert spec.shapes(dims, "outputs") == {"noise": (6, 4, 64, 96)}
    vae = model_specs(sd)["vae_decoder"]
    assert vae.shapes(vae.dims(3, 768, 512), "outputs") == {"images": (3, 3, 512, 768)}
    assert vae.dims_of({"latents": (2, 4, 40, 24)}) == {"B": 2, "h": 40, "w": 24, "H": 320, "W": 192}


def test_profiles_from_spec(sd):
    spec = model_specs(sd)["unet"]
    prof = ShapeProfile((1, 4), ((512, 512), (768, 512)), max_chunks=2)
    p = spec.input_profiles(prof)
    lo, opt, hi = p["sample"]
    assert lo == (1, 4, 64, 64)  # batch 1 without CFG is served too (guidance 1.0)
    assert opt == (8, 4, 64, 64) and hi == (8, 4, 64, 96)
    assert p["encoder_hidden_states"] == ((1, 77, 32), (8, 77, 32), (8, 154, 32))
    text = model_specs(sd)["text_encoder"].input_profiles(prof)
    assert text["inputs_embeds"] == ((1, 77, 32), (1, 77, 32), (2, 77, 32))
    buckets = prof.buckets()
    assert len(buckets) == 4 and all(not b.dynamic for b in buckets)
    assert spec.input_profiles(buckets[0])["sample"] == ((2, 4, 64, 64),) * 3


def test_profile_description_and_round_trip():
    prof = ShapeProfile((1, 4), ((512, 512),), dynamic=False)
    assert prof.describe() == "batch sizes 1, 4 at sizes 512x512 exactly (up to 3 prompt windows)"
    dyn = ShapeProfile((1, 4), ((512, 512), (768, 768)))
    assert dyn.describe().startswith("any batch of 1-4 frames and any size within 512x512, 768x768")
    assert ShapeProfile.from_dict(json.loads(json.dumps(dyn.as_dict()))) == dyn


def test_guidance_distilled_unet_is_refused_by_its_spec(sd):
    # Its exported graph would have no timestep_cond input: refused once, here, for every exported backend.
    from dataclasses import replace

    from diffusers import UNet2DConditionModel

    lcm = replace(sd, unet=UNet2DConditionModel(**{**sd.unet.config, "time_cond_proj_dim": 16}))
    with pytest.raises(UserError) as e:
        model_specs(lcm)
    assert "guidance-distilled (LCM)" in e.value.message and "--backend torch" in e.value.hint


def test_parse_flags():
    assert parse_sizes("512x512, 768x512") == ((512, 512), (768, 512))
    assert parse_batch_sizes("1,4,8") == (1, 4, 8)
    for bad in ("512", "500x512", "axb"):
        with pytest.raises(UserError):
            parse_sizes(bad)
    with pytest.raises(UserError):
        parse_batch_sizes("0,2")


def test_sample_inputs_follow_spec(sdxl):
    spec = model_specs(sdxl)["unet"]
    x = spec.sample_inputs(spec.dims(2, 256, 128), seed=3)
    assert x["sample"].shape == (4, 4, 16, 32) and x["time_ids"][0].tolist() == [128, 256, 0, 0, 128, 256]
    assert x["timestep"].shape == (1,)
    enc = model_specs(sdxl)["text_encoder"].sample_inputs({"B": 2})
    assert enc["eos_index"].dtype.is_floating_point is False and enc["eos_index"].max() < 77


def test_cache_key_changes_with_every_part(sd):
    base = cache.make_key(sd, "unet", "ort-cpu", "fp32")
    assert base.model_hash == sd.content_hash
    others = [cache.make_key(sd, "vae_decoder", "ort-cpu", "fp32"), cache.make_key(sd, "unet", "ort-cuda", "fp32"),
              cache.make_key(sd, "unet", "ort-cpu", "fp16"), cache.make_key(sd, "unet", "ort-cpu", "fp32", "static-b1")]
    digests = {k.digest for k in others + [base]}
    assert len(digests) == 5
    bumped = cache.ArtifactKey(*[getattr(base, f) for f in ("model_id", "model_hash", "component", "target", "dtype",
                                                             "profile_id")],
                               tuple(sorted({**dict(base.versions), "onnxruntime": "0.0.1"}.items())))
    assert bumped.digest != base.digest
    assert dict(base.versions)["onnxruntime"] and dict(base.versions)["exporter"]


def test_cache_is_atomic_and_lists_and_clears(sd, tmp_path):
    key = cache.make_key(sd, "unet", "ort-cpu", "fp32")
    with pytest.raises(RuntimeError):
        with cache.writing(key, tmp_path) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise RuntimeError("crash mid-export")
    assert cache.lookup(key, tmp_path) is None
    assert not any(p for p in tmp_path.rglob("*") if p.is_file())  # nothing half-written left behind
    with cache.writing(key, tmp_path) as tmp:
        (tmp / "model.onnx").write_bytes(b"graph")
        cache.commit(tmp, key, "model.onnx", {"covers": "test"})
    art = cache.lookup(key, tmp_path)
    assert art is not None
    assert art.manifest["files"] == {"model.onnx": {"bytes": 5, "sha256": _sha256(b"graph").hexdigest()}}
    assert json.loads((art.path / "manifest.json").read_text())["model_hash"] == sd.content_hash
    (art.path / "model.onnx").write_bytes(b"tr")  # a damaged file is not a hit
    assert cache.lookup(key, tmp_path) is None
    (art.path / "model.onnx").write_bytes(b"graph")
    assert [e.path for e in cache.list_entries(tmp_path)] == [art.path]
    assert cache.clear(tmp_path) == 1 and cache.list_entries(tmp_path) == []


def test_tensorrt_build_config_from_spec(sd, sdxl):
    from movielm_fast.export.tensorrt import build_config, engine_profiles

    prof = ShapeProfile((1, 2), ((256, 256), (384, 256)), max_chunks=1, dynamic=False)
    specs = model_specs(sd)
    cfg = build_config(sd, specs["unet"], prof, "fp16")
    assert cfg.static and cfg.fp16 and len(cfg.profiles) == 4
    assert cfg.profiles[0]["sample"] == ((2, 4, 32, 32),) * 3
    assert cfg.covers({"sample": (4, 4, 32, 48), "timestep": (1,), "encoder_hidden_states": (4, 77, 32)}) == 3
    assert cfg.covers({"sample": (6, 4, 32, 32), "timestep": (1,), "encoder_hidden_states": (6, 77, 32)}) is None
    json.dumps(cfg.as_dict())  # the recipe goes into the manifest
    # The tiny VAE asks for fp32 (force_upcast), like SDXL's: its engine is built without the fp16 flag.
    assert not build_config(sd, specs["vae_decoder"], prof, "fp16").fp16
    text = build_config(sdxl, model_specs(sdxl)["text_encoder_2"], prof, "fp16")
    assert not text.static and len(text.profiles) == 1
    assert len(engine_profiles(specs["unet"], prof)) == 4 and len(engine_profiles(specs["text_encoder"], prof)) == 1


def test_tensorrt_missing_is_a_clear_error(sd):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    from movielm_fast.engine.backends.base import create_backend
    from movielm_fast.engine.config import BackendConfig

    with pytest.raises(UserError) as e:
        create_backend("tensorrt", sd, BackendConfig(device="cuda"))
    assert e.value.message == "TensorRT is not installed" and "--backend onnxruntime" in e.value.hint


def test_tensorrt_runner_shape_check(sd):
    from movielm_fast.engine.backends.tensorrt_backend import check_within
    from movielm_fast.export.tensorrt import build_config

    prof = ShapeProfile((1,), ((256, 256),), max_chunks=1, dynamic=False)
    cfg = build_config(sd, model_specs(sd)["unet"], prof, "fp16")
    ok = {"sample": (2, 4, 32, 32), "timestep": (1,), "encoder_hidden_states": (2, 77, 32)}
    assert check_within(cfg, ok, prof.describe()) == 0
    with pytest.raises(UserError) as e:
        check_within(cfg, {**ok, "sample": (2, 4, 48, 32)}, prof.describe())
    assert "256x256" in e.value.message and "--sizes" in e.value.hint


def test_torch_backend_runs_the_exported_graph_modules(sdxl):
    # Parity between an exported graph and the torch backend holds by construction: both run export/graphs.py.
    from movielm_fast.engine.backends.base import create_backend
    from movielm_fast.engine.config import BackendConfig
    from movielm_fast.export.graphs import TextEncoderGraph, UNetGraph, VaeDecoderGraph

    backend = create_backend("torch", sdxl, BackendConfig())
    assert [type(e) for e in backend.encoders] == [TextEncoderGraph, TextEncoderGraph]
    assert isinstance(backend.unet, UNetGraph) and backend._unet_step is backend.unet
    assert isinstance(backend.vae, VaeDecoderGraph)


def test_unknown_backend(sd):
    from movielm_fast.engine.backends.base import create_backend
    from movielm_fast.engine.config import BackendConfig

    with pytest.raises(UserError) as e:
        create_backend("openvino", sd, BackendConfig())
    assert "onnxruntime" in e.value.hint and "tensorrt" in e.value.hint
