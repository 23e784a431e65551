"""ONNX export of the transformer families and the ONNX Runtime backend: one export of each transformer serves any
batch and size (torch's dynamo exporter), its weights go beside the graph above the external-data threshold, and
whole frames rendered on ONNX Runtime match our torch backend within 2/255 for FLUX.1 [dev] and FLUX.2 [klein] at
batch 1 and 2 and two sizes, from one export, and with a LoRA merged without re-export; `export` and `render
--backend onnxruntime` work from the CLI. The TensorRT build recipe for them (profiles, bf16) is plain Python and
tested here; building needs TensorRT and a GPU."""

import json

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


def test_export_and_render_on_onnxruntime_from_the_cli(tiny_flux_schnell, tmp_path):
    """`export` then `render --backend onnxruntime` on a FLUX folder, end to end through the CLI: the render uses
    the exported graphs (nothing is exported again) and its frames match `render --backend torch` within 2/255;
    bf16/fp16 ONNX and TensorRT without TensorRT (or a GPU) are one-line errors."""
    from click.testing import CliRunner

    from movielm_fast.cli.main import cli
    from tests.helpers import cli_json, load_png, movie, write_plan

    runner = CliRunner()
    res = runner.invoke(cli, ["export", "--model", str(tiny_flux_schnell), "--json"])
    assert res.exit_code == 0, res.output
    exported = json.loads(res.stdout)
    assert set(exported) == {"text_encoder", "text_encoder_2", TRANSFORMER, "vae_decoder"}
    assert all(a["target"] == "ort-cpu" and a["dtype"] == "fp32" for a in exported.values())
    assert exported[TRANSFORMER]["opset"] == onnx_export.DYNAMO_OPSET
    before = {str(a.path) for a in cache.list_entries()}

    plan = write_plan(tmp_path / "plan.json", [movie("fx", 2)], {"width": 96, "height": 64, "steps": 2})
    frames = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / backend
        summary = cli_json(["render", str(plan), "--model", str(tiny_flux_schnell), "--backend", backend,
                            "--out", str(out), "--json"])
        assert summary["rendered"] == 2
        frames[backend] = [load_png(out / "fx" / "frames" / f"{i:03d}.png") for i in range(2)]
    assert {str(a.path) for a in cache.list_entries()} == before  # the render found every graph in the cache
    for ours, ref in zip(frames["onnxruntime"], frames["torch"]):
        assert ours.shape == (64, 96, 3) and ours.std() > 1 and np.abs(ours - ref).max() <= 2

    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    for args, message in (
            (["export", "--dtype", "fp16"], "FLUX.1 overflows in fp16"),
            (["export", "--dtype", "bf16"], "not bf16 (bf16 is for TensorRT engines)"),
            *([] if has_trt else [(["export", "--backend", "tensorrt"], "TensorRT is not installed")]),
            (["render", str(plan), "--backend", "tensorrt", "--out", str(tmp_path / "trt")],
             "runs on CUDA only" if has_trt else "TensorRT is not installed")):
        res = runner.invoke(cli, [*args, "--model", str(tiny_flux_schnell)])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)


@pytest.mark.parametrize("fixture", ["tiny_flux_dev", "tiny_klein_distilled"])
def test_tensorrt_bucket_size_is_read_from_the_image_position_ids(request, fixture):
    """A static TensorRT engine is built per (batch, size) bucket; a transformer's packed tokens do not say the
    image size, its image position ids (as the family makes them for a render) do."""
    from movielm_fast.engine.backends.tensorrt_backend import _image_size

    r = Renderer(ModelConfig(model=str(request.getfixturevalue(fixture))))
    spec = model_specs(r.model)[TRANSFORMER]
    for width, height in ((96, 64), (64, 160)):
        s = BatchSettings(width, height, 2, 1.0, "default")
        cond = r.model.family.conditioning(r.model, r.encoder, [FrameJob("m", "f", PROMPT, "", 1)], s, False)
        assert _image_size(spec, {"B": 1}, {"img_ids": cond.img_ids}) == (width, height)
