"""What the render core is configured with: the model to load, the backend that runs it, and how.

`ModelConfig` is everything a loaded model needs, read once when it loads (a `serve` process keeps it resident);
`BackendConfig`, the part of it a backend reads. Per-run choices (output folder, image files, resume, batch size)
are `run.config.RunConfig`'s, and a plan's render settings `plan.RenderSettings`'. Each field is declared once with
`setting(...)` (movielm_fast.settings): the CLI's flags and `serve`'s refusals are made from these declarations.
Every lossy speed-up is opt-in and its declaration says so; the measured cost of each is in bench/RESULTS.md.

This module imports no torch: the CLI reads it to build its flags before anything heavy loads.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator

from movielm_fast.errors import UserError
from movielm_fast.kernels.attention import ATTENTION_CHOICES, SDPA_BACKENDS
from movielm_fast.plan import CONSISTENCY_MODES
from movielm_fast.settings import Settings, positive_or_auto, setting

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "fp16", "bf16")
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt", "null")
"""The backends engine.backends.base registers (BUILTIN), named here so that a flag's choices need no torch."""
QUANTIZE_MODES = ("fp8", "fp8-emulated")


def torch_dtype(name: str) -> torch.dtype:
    """fp32 | fp16 | bf16 -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(n for n in DTYPE_NAMES if torch_dtype(n) == dtype)


class BackendConfig(Settings):
    """Where and how a backend runs a model's modules."""

    device: str = setting("cpu", "cpu | cuda | cuda:N")
    threads: int | Literal["auto"] = setting(
        "auto", "CPU threads of torch and ONNX Runtime: N, or auto (torch's default or OMP_NUM_THREADS, capped at "
                "the cores this process may use, one per physical core, and at one more than the cores other work "
                "leaves free; one for a small model such as the demo). Idle threads wait without spinning "
                "(OMP_WAIT_POLICY=PASSIVE unless set), so a busy machine does not stall them; measured in "
                "bench/RESULTS.md, 'CPU threads under load'.", metavar="N|auto")
    dtype: Literal[("auto", *DTYPE_NAMES)] = setting(  # type: ignore[valid-type]
        "auto", "auto (fp16 on CUDA, fp32 on the CPU) | fp32 | fp16 | bf16. fp16/bf16 change pixels slightly; the VAE "
                "stays fp32 where the model says it overflows in fp16.")
    attention: Literal[ATTENTION_CHOICES] = setting(  # type: ignore[valid-type]
        "sdpa", "sdpa (PyTorch's fused attention) | xformers. Both exact.")
    sdpa_backend: Literal[("auto", *SDPA_BACKENDS)] = setting(  # type: ignore[valid-type]
        "auto", "The kernel the UNet's SDPA calls use: auto (as measured for this GPU, engine/cuda_knobs.py; else "
                "PyTorch picks per call) | flash | cudnn | efficient | math. All exact.")
    channels_last: bool = setting(True, "NHWC memory format for UNet/VAE convolutions on CUDA (lossless).", flag=None)
    fuse_qkv: bool = setting(True, "One matmul for each attention's Q/K/V projections on CUDA (diffusers' "
                                   "fuse_qkv_projections; lossless).", flag=None)
    cuda_graphs: bool | None = setting(
        None, "Replay the UNet step as a CUDA graph per (batch, size) bucket: lossless, one capture per new shape. "
              "Default: as measured (engine/cuda_knobs.py), which is on wherever it is valid (not with --compile; "
              "batches with consistency anchors run eager).", flag="--cuda-graphs/--no-cuda-graphs")
    cudnn_benchmark: bool | None = setting(
        None, "cuDNN's per-shape convolution algorithm search on CUDA (lossless up to rounding). Default: as "
              "measured, else off.", flag="--cudnn-benchmark/--no-cudnn-benchmark")
    compile_unet: bool = setting(
        False, "torch.compile the UNet step (slow first call of each shape). On the CPU: inductor with frozen "
               "weights; --dtype bf16 on an AMX / AVX-512-BF16 CPU turns it on by itself.", flag="--compile")
    offload_text_encoders: bool = setting(
        False, "Keep the text encoders in host memory and move each onto the device only to encode a batch's new "
               "prompts: the device holds the denoiser alone while it runs (FLUX's T5 and klein's Qwen3 are large), "
               "at the cost of a host-to-device copy per batch with new prompts. Lossless.",
        flag="--offload-text-encoders")
    quantize: Literal[QUANTIZE_MODES] | None = setting(  # type: ignore[valid-type]
        None, "LOSSY: the matmuls of the UNet's attention blocks, or of a transformer's blocks, in FP8 e4m3 "
              "(engine/fp8.py; GPUs of compute capability 8.9+: Ada, Hopper). fp8-emulated: the same rounding in "
              "fp32 on any device, to measure quality.")

    _threads = field_validator("threads", mode="before")(classmethod(lambda cls, v: positive_or_auto(v)))

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}: use cpu, cuda or cuda:N")
        return value

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda was requested but this machine has no usable CUDA device "
                            "(or torch was installed without CUDA)", "use --device cpu, or install a CUDA build "
                                                                     "of torch")
        return torch.device(self.device)

    @property
    def dtype_name(self) -> str:
        """The dtype the model runs in: `dtype`, with auto resolved for the device."""
        if self.dtype != "auto":
            return self.dtype
        return "fp16" if self.torch_device.type == "cuda" else "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)


class ModelConfig(BackendConfig):
    """What a loaded model needs: which model, which backend, and the render core's options for it."""

    model: str = setting("demo", "Image model: 'demo' (a small model trained on the toy world), a diffusers folder "
                                 "or a .safetensors file.")
    backend: Literal[BACKEND_NAMES] = setting(  # type: ignore[valid-type]
        "torch", "torch | onnxruntime | tensorrt | null (measures the engine's own work; no real images)")
    step_cache: int | None = setting(
        None, "LOSSY: run the whole UNet every N-th step and only its shallow layers in between, reusing the deep "
              "features (DeepCache); a transformer (FLUX): the whole of it on the first 3 steps and then every N-th, "
              "extrapolated in between (diffusers' TaylorSeer). For 20+ steps; torch backend. Default: off.",
        metavar="N", ge=1)
    step_cache_depth: int = setting(0, "What --step-cache keeps: 0 is the fastest and most lossy; higher recomputes "
                                       "more (a UNet's skip branch; a transformer's 0: its output, 1: its attention "
                                       "outputs).", ge=0)
    loras: tuple[tuple[str, float], ...] = setting(
        (), "Merge a LoRA (.safetensors; kohya/A1111 or diffusers/PEFT) into every movie at SCALE [1.0]; "
            "repeatable. Plans add their own in style.loras / loras.", flag="--lora", metavar="FILE[:SCALE]",
        served=("applies to a server's every plan",
                "name the LoRA in the plan (loras or style.loras), or start the server with --lora"))
    consistency: Literal[CONSISTENCY_MODES] | None = setting(  # type: ignore[valid-type]
        None, "Consistent characters for every movie (character_token: a token per character learned from its "
              "anchor render, in every frame that shows it; anchor_attention: frames attend to their characters' "
              "anchor renders, torch backend; docs/consistency.md). Default: as each plan says.",
        served=("applies to a server's every plan",
                "set consistency in the plan, or start the server with --consistency"))
    anchor_cache_mb: int = setting(4096, "Memory for character-anchor records (consistency mode); beyond it the "
                                         "least recently used are dropped and recomputed when needed.", flag=None, ge=1)

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_refs(cls, value: Any) -> Any:
        """--lora FILE[:SCALE] strings -> (FILE, SCALE); (file, scale) pairs pass as they are."""
        if isinstance(value, (list, tuple)):
            return tuple(parse_lora(v) if isinstance(v, str) else v for v in value)
        return value

    @property
    def backend_config(self) -> BackendConfig:
        """The fields a backend reads, and only those."""
        return BackendConfig(**self.model_dump(include=set(BackendConfig.model_fields)))


def parse_lora(value: str) -> tuple[str, float]:
    """FILE[:SCALE] -> (FILE, SCALE). Only a number after the last ':' is a scale, so C:\\x.safetensors or a
    path with colons in it stays whole."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, 1.0
