"""ONNX export of the transformer families and the ONNX Runtime backend: one export of each transformer serves any
batch and size (torch's dynamo exporter), its weights go beside the graph above the external-data threshold, and
whole frames rendered on ONNX Runtime match our torch backend within 2/255 for FLUX.1 [dev] and FLUX.2 [klein] at
batch 1 and 2 and two sizes, from one export, and with a LoRA merged without re-export. The TensorRT build recipe for them (profiles, bf16) is plain Python
and tested here; building needs TensorRT and a GPU."""

import numpy as np
import pytest

from movielm_fast.engine.config import ModelConfig
from movielm_fast.engine.jobs import BatchSettings, FrameJob
from movielm_fast.engine.models import load_model
from movielm_fast.engine.pipeline import render_batch
from movielm_fast.export import cache, onnx_export
from movielm_fast.export.specs import TRANSFORMER, ShapeProfile, model_specs
from movielm_fast.export.tensorrt import build_config
from movielm_fast.run.renderer import Renderer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def _render(path, backend, seeds, size, guidance):
    r = Renderer(ModelConfig(model=str(path), backend=backend))
    jobs = [FrameJob("m", f"f{i}", PROMPT, "blurry", seed) for i, seed in enumerate(seeds)]
    images = render_batch(r.model, r.backend, r.encoder, jobs, BatchSettings(*size, 3, guidance, "default"))
    return [im.astype(np.int16) for im in images]


@pytest.mark.parametrize("fixture,guidance", [("tiny_flux_dev", 3.5), ("tiny_klein", 4.0)])
def test_onnxruntime_frames_match_torch_from_one_export(request, fixture, guidance):
    """[dev]: embedded guidance, one transformer pass per frame; klein base: CFG against the negative prompt, so
    the graph sees batches 2 and 4. Two sizes (square, and wider than tall), every graph exported once."""
    path = request.getfixturevalue(fixture)
    for seeds, size in (((11,), (64, 64)), ((11, 12), (96, 64))):
        ours = _render(path, "onnxruntime", seeds, size, guidance)
        ref = _render(path, "torch", seeds, size, guidance)
        for a, b in zip(ours, ref):
            assert a.shape == (size[1], size[0], 3) and a.std() > 1
            assert np.abs(a - b).max() <= 2, (fixture, seeds, size)
    model_hash = load_model(str(path)).content_hash
    transformers = [a for a in cache.list_entries() if a.manifest["model_hash"] == model_hash
                    and a.manifest["component"] == TRANSFORMER]
    assert len(transformers) == 1  # the second batch and size were served by the first export


def test_lora_on_onnxruntime_matches_torch(tiny_flux_dev, tmp_path):
    """A LoRA (transformer and CLIP) merged into the exported graphs' initializers by the weight map, without
    re-export: the same frame as the torch backend's merge; the plain set brings the exported weights back."""
    from movielm_fast.engine import lora
    from movielm_fast.testing import make_random_dit_lora

    ort, ref = (Renderer(ModelConfig(model=str(tiny_flux_dev), backend=b)) for b in ("onnxruntime", "torch"))
    f = make_random_dit_lora(tmp_path / "l.safetensors", ref.model.transformer, ref.model.text_encoders[0], seed=3,
                             std=0.2)

    def frame(r, loras=()):
        s = BatchSettings(64, 64, 3, 3.5, "default", loras=loras)
        job = FrameJob("m", "f", PROMPT, "", 42)
        return render_batch(r.model, r.backend, r.encoder, [job], s, library=r.loras)[0].astype(np.int16)

    merged = lora.combine([(f, 0.8)])
    ours, theirs, plain = frame(ort, merged), frame(ref, merged), frame(ref)
    assert np.abs(ours - theirs).max() <= 2 and np.abs(ours - plain).max() > 10
    assert np.abs(frame(ort) - plain).max() <= 2


@pytest.mark.parametrize("fixture", ["tiny_flux_schnell", "tiny_klein_distilled"])
def test_transformer_graph_is_dynamic_and_external_data(request, fixture, tmp_path, monkeypatch):
    """Protobuf cannot hold over 2 GB: above EXTERNAL_DATA_BYTES the weights are written to one file beside the
    graph (a real FLUX transformer's are 24 GB in bf16); the tiny one is pushed over a threshold of 0. The graph
    keeps its batch and image tokens symbolic: it matches torch at batches and sizes it was not traced at."""
    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model = load_model(str(request.getfixturevalue(fixture)))
    art = onnx_export.export_component(model, TRANSFORMER, "ort-cpu")
    assert (art.path / "model.onnx.data").is_file() and art.manifest["opset"] == onnx_export.DYNAMO_OPSET
    spec = model_specs(model)[TRANSFORMER]
    for dims in (spec.dims(frames=1, width=64, height=64, cfg=False), spec.dims(frames=3, width=128, height=64),
                 spec.dims(frames=1, width=96, height=160, cfg=False)):
        assert max(onnx_export.parity(model, spec, art.file(), dims, seed=4).values()) < 1e-4, dims


def test_tensorrt_recipe_for_a_transformer(tiny_flux_dev):
    """bf16 engines (FLUX overflows in fp16) with profiles from the transformer's spec: the batch from frames x the
    guidance batch, the image tokens from the sizes (one per 16x16 pixels)."""
    model = load_model(str(tiny_flux_dev))
    spec = model_specs(model)[TRANSFORMER]
    dynamic = build_config(model, spec, ShapeProfile((1, 2), ((512, 512), (1024, 768)), cfg=True), "bf16")
    assert (dynamic.bf16, dynamic.fp16, dynamic.static) == (True, False, False)
    prof = dynamic.profiles[0]
    assert prof["hidden_states"] == ((1, 1024, 16), (4, 1024, 16), (4, 3072, 16))
    assert prof["encoder_hidden_states"] == ((1, 512, 32), (4, 512, 32), (4, 512, 32))
    assert prof["img_ids"] == ((1024, 3), (1024, 3), (3072, 3)) and prof["guidance"] == ((1,),) * 3
    static = build_config(model, spec, ShapeProfile((2,), ((1024, 1024),), cfg=False, dynamic=False), "fp32")
    assert (static.bf16, static.fp16, static.static) == (False, False, True)
    assert static.profiles[0]["hidden_states"] == ((2, 4096, 16),) * 3
