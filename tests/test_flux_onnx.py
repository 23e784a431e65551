"""ONNX export of the transformer families: the transformer exports and ONNX Runtime matches torch at the shape it
was traced at, with its weights beside the graph above the external-data threshold. Not yet at other batches and
sizes: torch's TorchScript exporter freezes the attention reshapes after diffusers' `unflatten` (docs/models.md), so
the ONNX Runtime and TensorRT backends refuse these families with a clear error."""

import pytest

from movielm_fast.engine.config import ModelConfig
from movielm_fast.export import onnx_export
from movielm_fast.export.specs import TRANSFORMER
from movielm_fast.run.renderer import Renderer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("onnxruntime")


def test_onnx_backends_are_refused_for_now(tiny_flux_dev):
    from movielm_fast.errors import UserError

    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(UserError, match=f"--backend {backend} is not available for FLUX.1 yet"):
            Renderer(ModelConfig(model=str(tiny_flux_dev), backend=backend))


def test_transformer_weights_go_to_external_data(tiny_flux_schnell, tmp_path, monkeypatch):
    """Protobuf cannot hold over 2 GB: above EXTERNAL_DATA_BYTES the weights are written to one file beside the
    graph (a real FLUX transformer's are 24 GB in bf16). The tiny one is pushed over a threshold of 0."""
    from movielm_fast.engine.models import load_model

    monkeypatch.setenv("MOVIELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model = load_model(str(tiny_flux_schnell))
    art = onnx_export.export_component(model, TRANSFORMER, "ort-cpu")
    assert (art.path / "model.onnx.data").is_file()
    spec = onnx_export.model_specs(model)[TRANSFORMER]
    dims = onnx_export.trace_dims(spec)  # the traced shape: batch 2, 16 image tokens
    assert max(onnx_export.parity(model, spec, art.file(), dims).values()) < 1e-4
    with pytest.raises(Exception, match="Reshape"):  # elsewhere it fails (what the backends refuse)
        onnx_export.parity(model, spec, art.file(), spec.dims(frames=3, width=128, height=64, cfg=False))
