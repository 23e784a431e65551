"""What each backend needs from the cache, exported or built on demand: one call for the CLI and the backends."""

from __future__ import annotations

from engine.errors import UserError

from . import cache
from .specs import ShapeProfile, default_profile, model_specs

BACKENDS = ("onnxruntime", "tensorrt")


def component_dtype(model, component: str, dtype: str) -> str:
    """Some VAEs (SDXL's) overflow in fp16 and say so in their config (`force_upcast`): keep those fp32."""
    if dtype == "fp16" and component == "vae_decoder" and getattr(model.vae.config, "force_upcast", False):
        return "fp32"
    return dtype


def ort_target(device: str) -> str:
    return "ort-cuda" if device.startswith("cuda") else "ort-cpu"


def require_ort_provider(device: str) -> list[str]:
    """The execution providers for `device`; a clear error when this onnxruntime build lacks the one needed."""
    try:
        import onnxruntime as ort
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
    from .onnx_export import export_component

    target = ort_target(device)
    return {c: export_component(model, c, target, component_dtype(model, c, dtype), profile)
            for c in model_specs(model)}


def export_for_backend(model, backend: str, device: str, dtype: str, profile: ShapeProfile | None = None
                       ) -> dict[str, cache.Artifact]:
    if backend not in BACKENDS:
        raise UserError(f"cannot export for backend {backend!r}", f"choose one of: {', '.join(BACKENDS)} "
                                                                  "(the torch backend needs no export)")
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") or backend == "tensorrt" else "fp32"
    profile = profile or default_profile(model)
    if backend == "onnxruntime":
        require_ort_provider(device)
        return export_onnx_set(model, device, dtype, profile)
    from .tensorrt import build_engines

    return build_engines(model, dtype, profile)
