"""ONNX export and the ONNX Runtime backend against torch: every component on random inputs, whole frames, textual
inversion with an existing artifact, and the errors a user can hit."""

import json
import shutil

import numpy as np
import pytest
import torch

from movielm_fast.engine.config import BackendConfig, ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.errors import UserError
from movielm_fast.export import cache
from movielm_fast.export.artifacts import export_onnx_set
from movielm_fast.export.onnx_export import parity
from movielm_fast.export.specs import model_specs
from movielm_fast.run.renderer import Renderer

pytest.importorskip("onnxruntime")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@pytest.fixture(scope="module")
def sd_artifacts(tiny_sd):
    model = load_model(tiny_sd)
    return model, export_onnx_set(model, "cpu", "fp32")


@pytest.fixture(scope="module")
def sdxl_artifacts(tiny_sdxl):
    model = load_model(tiny_sdxl)
    return model, export_onnx_set(model, "cpu", "fp32")


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_every_component_matches_torch(which, sd_artifacts, sdxl_artifacts):
    model, arts = sd_artifacts if which == "sd" else sdxl_artifacts
    specs = model_specs(model)
    assert set(arts) == set(specs)
    for component, art in arts.items():
        spec = specs[component]
        # Shapes unlike the traced ones: other batch, non-square, a latent size that is not a multiple of 4.
        for dims in (spec.dims(3, 72, 40, chunks=2), spec.dims(1, 128, 128)):
            diffs = parity(model, spec, art.file(), dims, seed=5)
            assert max(diffs.values()) <= 1e-4, (component, dims, diffs)
        m = art.manifest
        assert m["model_hash"] == model.content_hash and m["component"] == component
        assert json.loads((art.path / "manifest.json").read_text())["files"]["model.onnx"]["bytes"] > 0


def test_cache_hit_is_logged_and_reused(sd_artifacts, caplog):
    model, arts = sd_artifacts
    before = {c: a.path.stat().st_mtime_ns for c, a in arts.items()}
    with caplog.at_level("INFO", logger="movielm_fast"):
        again = export_onnx_set(model, "cpu", "fp32")
    assert {c: a.path for c, a in again.items()} == {c: a.path for c, a in arts.items()}
    assert {c: a.path.stat().st_mtime_ns for c, a in again.items()} == before
    assert sum("artifact cache hit" in r.message for r in caplog.records) == len(arts)


def _render(model_path, backend, prompt=PROMPT, size=64, guidance=7.5, steps=3, seeds=(11,)):
    r = Renderer(ModelConfig(model=str(model_path), backend=backend))
    jobs = [FrameJob("m", f"f{i}", prompt, "blurry", s) for i, s in enumerate(seeds)]
    return [im.astype(np.int16) for im in render_batch(r.model, r.backend, r.encoder, jobs,
                                                       BatchSettings(size, size, steps, guidance, "dpmpp"))]


def test_sd_frames_match_torch_backend(tiny_sd, sd_artifacts):
    ours = _render(tiny_sd, "onnxruntime", seeds=(11, 12))
    ref = _render(tiny_sd, "torch", seeds=(11, 12))
    for a, b in zip(ours, ref):
        assert a.shape == (64, 64, 3) and a.std() > 1
        assert np.abs(a - b).max() <= 2


def test_sdxl_frames_match_torch_backend(tiny_sdxl, sdxl_artifacts):
    # Non-square, with a latent side (9) that is not a multiple of the UNet's downsampling.
    r_ort = Renderer(ModelConfig(model=str(tiny_sdxl), backend="onnxruntime"))
    r_pt = Renderer(ModelConfig(model=str(tiny_sdxl), backend="torch"))
    s = BatchSettings(72, 64, 3, 6.0, "euler")
    job = [FrameJob("m", "f", PROMPT, "", 7)]
    a = render_batch(r_ort.model, r_ort.backend, r_ort.encoder, job, s)[0].astype(np.int16)
    b = render_batch(r_pt.model, r_pt.backend, r_pt.encoder, job, s)[0].astype(np.int16)
    assert a.shape == (64, 72, 3) and a.std() > 1
    assert np.abs(a - b).max() <= 2


def test_backend_sessions_are_created_once(tiny_sd, sd_artifacts):
    r = Renderer(ModelConfig(model=str(tiny_sd), backend="onnxruntime"))
    sessions = {c: id(g.session) for c, g in r.backend.graphs.items()}
    render_batch(r.model, r.backend, r.encoder, [FrameJob("m", "f", PROMPT, "", 1)],
                 BatchSettings(64, 64, 2, 5.0, "ddim"))
    assert {c: id(g.session) for c, g in r.backend.graphs.items()} == sessions
    assert r.backend.graphs["unet"].session.get_session_options().intra_op_num_threads >= 1


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_new_embedding_works_with_existing_artifact(which, tiny_sd, tiny_sdxl, sd_artifacts, sdxl_artifacts):
    """Textual inversion: the text encoder graph takes inputs_embeds, so a token added after export needs no
    re-export, and ORT encodes it exactly as torch does."""
    path = tiny_sd if which == "sd" else tiny_sdxl
    r_ort = Renderer(ModelConfig(model=str(path), backend="onnxruntime"))
    r_pt = Renderer(ModelConfig(model=str(path), backend="torch"))
    mtimes = {c: g.session for c, g in r_ort.backend.graphs.items()}
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(2, t.shape[1], generator=g) * 0.5 for t in r_pt.encoder.tables]
    prompt = "a castle in <my-style> colours"
    without = r_ort.encoder.encode(prompt).hidden
    for r in (r_ort, r_pt):
        r.encoder.add_token("<my-style>", vectors, "test.safetensors")
    ours, ref = r_ort.encoder.encode(prompt), r_pt.encoder.encode(prompt)
    assert (ours.hidden - without).abs().max() > 1e-2  # the new vectors really reach the encoder
    assert torch.allclose(ours.hidden, ref.hidden, atol=1e-5, rtol=0)
    if which == "sdxl":
        assert torch.allclose(ours.pooled, ref.pooled, atol=1e-5, rtol=0)
    assert {c: g.session for c, g in r_ort.backend.graphs.items()} == mtimes  # same sessions, nothing re-exported


def test_artifact_from_another_model_is_refused(tiny_sd, tiny_sd_v, sd_artifacts):
    from movielm_fast.engine.backends.onnx_backend import OrtGraph
    from movielm_fast.export.onnx_export import export_component

    model_a, arts = sd_artifacts
    model_b = load_model(tiny_sd_v)
    # 1. A folder copied under model B's key: the manifest names model A.
    key_b = cache.make_key(model_b, "unet", "ort-cpu", "fp32")
    target = cache.entry_path(key_b)
    shutil.copytree(arts["unet"].path, target)
    try:
        with pytest.raises(UserError) as e:
            export_component(model_b, "unet", "ort-cpu", "fp32")
        assert model_a.content_hash in e.value.message and "--clear" in e.value.hint
        # 2. A manifest rewritten to claim model B: the ONNX file itself still says model A.
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["model_hash"] = model_b.content_hash
        (target / "manifest.json").write_text(json.dumps(manifest))
        art = cache.lookup(key_b)
        with pytest.raises(UserError) as e:
            OrtGraph(art, model_specs(model_b)["unet"], model_b, ["CPUExecutionProvider"], torch.device("cpu"),
                     torch.float32)
        assert "another model" in e.value.message
    finally:
        shutil.rmtree(target)


def test_missing_execution_provider_and_dtype(sd_artifacts):
    import onnxruntime as ort

    from movielm_fast.engine.backends.base import create_backend

    model, _ = sd_artifacts
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError) as e:
            create_backend("onnxruntime", model, BackendConfig(device="cuda"))
        assert "CUDAExecutionProvider" in e.value.message and "onnxruntime-gpu" in e.value.hint
    with pytest.raises(UserError) as e:
        create_backend("onnxruntime", model, BackendConfig(dtype="bf16"))
    assert "fp32" in e.value.hint
    with pytest.raises(UserError):
        from movielm_fast.export.onnx_export import export_component

        export_component(model, "unet", "ort-cpu", "fp16")


def test_guidance_distilled_unet_is_refused_before_any_export(sd_artifacts, tmp_path, monkeypatch):
    from dataclasses import replace

    from diffusers import UNet2DConditionModel

    from movielm_fast.engine.backends.base import create_backend

    model, _ = sd_artifacts
    lcm = replace(model, unet=UNet2DConditionModel(**{**model.unet.config, "time_cond_proj_dim": 16}),
                  content_hash="lcm-variant")
    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path))
    with pytest.raises(UserError) as e:
        create_backend("onnxruntime", lcm, BackendConfig())
    assert "guidance-distilled (LCM)" in e.value.message and "--backend torch" in e.value.hint
    assert not any(tmp_path.rglob("*.onnx"))  # refused up front, not after exporting the text encoder


def test_fp16_conversion_keeps_sensitive_nodes_fp32(sd_artifacts, tmp_path):
    """The CUDA graph cannot run here; check its structure: fp16 weights, fp32 timestep IO and time embedding."""
    import onnx

    from movielm_fast.export.onnx_export import to_fp16

    model, arts = sd_artifacts
    spec = model_specs(model)["unet"]
    proto = to_fp16(onnx.load(str(arts["unet"].file())), spec, upcast_attention=True)
    onnx.checker.check_model(proto)
    io = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert io["timestep"] == onnx.TensorProto.FLOAT and io["sample"] == onnx.TensorProto.FLOAT16
    floats = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in floats) > 0.9 * len(floats)
    by_name = {n.name: n for n in proto.graph.node}
    sin = [n for n in by_name.values() if n.op_type == "Sin" and "time_proj" in n.name]
    assert sin  # the sinusoidal embedding is still there and was blocked from conversion
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert softmax
    # Blocked nodes get Cast-to-fp32 inputs inserted in front of them.
    producers = {o: n for n in proto.graph.node for o in n.output}
    for n in softmax[:2]:
        src = producers[n.input[0]]
        while src.op_type not in ("Cast", "MatMul"):
            src = producers[src.input[0]]
        assert src.op_type == "MatMul" or src.attribute[0].i == onnx.TensorProto.FLOAT
