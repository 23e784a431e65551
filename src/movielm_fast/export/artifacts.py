"""What each backend needs from the cache, exported or built on demand: one call for the CLI and the backends."""

from __future__ import annotations

from movielm_fast.errors import UserError

from . import cache
from .onnx_export import export_component
from .specs import ShapeProfile, component_dtype, default_profile, model_specs
from .tensorrt import build_engines

BACKENDS = ("onnxruntime", "tensorrt")


def ort_target(device: str) -> str:
    return "ort-cuda" if device.startswith("cuda") else "ort-cpu"


def require_ort_provider(device: str) -> list[str]:
    """The execution providers for `device`; a clear error when this onnxruntime build lacks the one needed."""
    try:
        import onnxruntime as ort  # optional dependency (the onnx extra)
    except ImportError:
        raise UserError("onnxruntime is not installed", "pip install 'movielm-fast[onnx]' (or onnxruntime-gpu for "
                                                        "CUDA), or use --backend torch") from None
    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise UserError(f"this onnxruntime has no CUDAExecutionProvider (it has: {', '.join(available)})",
                            "pip uninstall onnxruntime && pip install onnxruntime-gpu, or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def export_onnx_set(model, device: str, dtype: str, profile: ShapeProfile | None = None) -> dict[str, cache.Artifact]:
    """ONNX Runtime artifacts (one per component) from the cache, exporting the missing ones."""
    target = ort_target(device)
    return {c: export_component(model, c, target, component_dtype(model, c, dtype), profile)
            for c in model_specs(model)}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"cannot export for backend {backend!r}", f"choose one of: {', '.join(BACKENDS)} "
                                                                  "(the torch backend needs no export)")


def auto_dtype(model, backend: str, device: str) -> str:
    """What `--dtype auto` exports: the model family's CUDA dtype for TensorRT and for CUDA (fp16; bf16 for the
    transformer families, which overflow fp16), fp32 on the CPU and for the families whose CUDA dtype ONNX Runtime
    has no graphs for (bf16)."""
    cuda = model.family.cuda_dtype
    if backend == "tensorrt" or (device.startswith("cuda") and cuda == "fp16"):
        return cuda
    return "fp32"


def export_for_backend(model, backend: str, device: str, dtype: str, profile: ShapeProfile | None = None
                       ) -> dict[str, cache.Artifact]:
    """`dtype`: fp32, fp16 or (TensorRT) bf16; `auto_dtype` resolves auto."""
    check_backend(backend)
    profile = profile or default_profile(model)
    if backend == "onnxruntime":
        require_ort_provider(device)
        return export_onnx_set(model, device, dtype, profile)
    return build_engines(model, dtype, profile)
