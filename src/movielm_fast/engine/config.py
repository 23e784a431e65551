"""The one configuration object of a render run.

The CLI parses flags into an `EngineConfig`; nothing below the CLI reads flags or environment variables for
behaviour. Every lossy speed-up is opt-in and its field documents the quality cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from movielm_fast.errors import UserError
from movielm_fast.plan import RenderSettings

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EngineConfig:
    model: str = "demo"
    """"demo" (the small model trained on the toy world, bench/toy: 64x64 scenes of coloured shapes), a diffusers
    folder, or a .safetensors file."""
    out: Path = Path("out")
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "auto"
    """fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on CPU). fp16/bf16 change pixels slightly (PSNR > 35 dB
    against fp32 is the quality bar); the VAE stays fp32 where the model says it overflows in fp16."""
    batch_size: int | str = "auto"
    """Frames per UNet batch (CFG doubles it). "auto": the largest that fits, from free memory."""
    attention: str = "sdpa"
    """sdpa (PyTorch fused attention, lossless) | xformers."""
    sdpa_backend: str = "auto"
    """The kernel PyTorch's SDPA uses in the UNet: auto (as measured, engine/cuda_knobs.py; else PyTorch picks per
    call) | flash | cudnn | efficient | math. All exact attention."""
    channels_last: bool = True
    """NHWC memory format for UNet/VAE convolutions on CUDA: lossless, usually faster."""
    fuse_qkv: bool = True
    """Fuse each attention's Q/K/V projections into one matmul on CUDA (diffusers' fuse_qkv_projections): lossless."""
    cuda_graphs: bool | None = None
    """Replay the UNet step as a captured CUDA graph per (batch, size) bucket: lossless, removes launch overhead;
    costs one capture per bucket (the first step of a new shape) and memory for static buffers. None (default): as
    measured (engine/cuda_knobs.py), which is on wherever it is valid -- not with `compile_unet`; batches of
    consistency mode run eager -- because it was faster at every measured batch size on an H200 (3.6x at batch 1,
    bench/RESULTS.md); True: required (consistency mode is then an error); False: never."""
    cudnn_benchmark: bool | None = None
    """cuDNN's per-shape convolution algorithm search (torch.backends.cudnn.benchmark) on CUDA: lossless up to
    rounding, costs a search on the first call of each shape. None: as measured (engine/cuda_knobs.py), else off."""
    compile_unet: bool = False
    """torch.compile the UNet step (mode "reduce-overhead" on CUDA, which also replays CUDA graphs): lossless up to
    kernel-fusion rounding; costs a compile of tens of seconds per shape bucket. Exclusive with `cuda_graphs`. On the
    CPU: inductor with freezing and weight prepacking, each compile reported and cached on disk (engine/cpu.py);
    `--dtype bf16` on an AMX / AVX-512-BF16 CPU turns it on by itself, for the VAE decoder too."""
    overrides: RenderSettings = field(default_factory=RenderSettings)
    """Command-line render settings; they win over the plan's own."""
    skip_existing: bool = True
    replace: bool = False
    """--replace: render a movie whose id is already in OUT for another movie (another title or plan file) over it;
    without it such a render is refused, so one plan never silently overwrites another's frames."""
    style_training: bool = False
    """Immobilize styles that have no embedding (train one textual-inversion token each, cached in the style
    library) before rendering. The CLI turns it on unless --no-style-training."""
    image_format: str = "png"
    """png (lossless, the default) | jpg | webp. JPEG/WebP are lossy (quality 95/90: visually lossless, files about
    a tenth of PNG's, encoding ~15x faster); every format carries the prompt, seed and model in the file."""
    image_quality: int | None = None
    """JPEG/WebP quality 1-100; None: 95 for jpg, 90 for webp."""
    writer_threads: int = 2
    """Threads that encode and write frame files while the next batch renders; 0 writes on the render thread."""
    consistency: str | None = None
    """--consistency: none | anchor_attention for every movie (the rest of each movie's consistency settings
    stays); None: as the plans say."""
    anchor_cache_mb: int = 4096
    """Character-anchor records (consistency mode) a renderer keeps in memory; beyond it the least recently used
    are dropped and recomputed when needed again."""
    step_cache: int | None = None
    """--step-cache N: DeepCache-style step caching (engine/step_cache.py), off by default. LOSSY. Every N-th
    denoising step runs the whole UNet and keeps the deep features at skip branch `step_cache_depth`; the N-1 steps
    between recompute only the shallow layers outside it and reuse those features. Gain, N=3, 50 steps, depth 0:
    2.55x (SD 1.5, 512²) / 2.86x (SDXL, 1024²) fewer UNet FLOPs; 2.4x less UNet time on the demo model on a CPU
    (python -m movielm_fast.bench.step_cache). Cost: each cached step reads features up to N-1 steps old, so fine
    detail drifts while the layout stays: on the demo model at 50 steps 44-45 dB PSNR / 0.99 SSIM against the
    uncached render and the toy judge's conditioning rate 0.94 against 0.96; at 20 steps 35.6 dB and 0.94 against
    0.98 (bench.toy_quality, 50 captions; README has the table).
    Pointless at 8 steps or fewer: few steps can be skipped, and neighbouring steps differ more. None or 1: off.
    Recorded in each frame's resume key and the manifest; torch backend only; refused with consistency mode
    (anchor attention records and reads every attention layer at every step)."""
    step_cache_depth: int = 0
    """--step-cache-depth: the skip branch whose deep features are cached, counted from the outside (DeepCache's
    branch id). 0: a cached step runs only conv_in, the last up-block layer and conv_out (fastest, most lossy);
    larger: more layers recomputed on cached steps (slower, closer to the uncached render)."""
    quantize: str | None = None
    """--quantize fp8 | fp8-emulated (engine/fp8.py), off by default. LOSSY. fp8: the UNet's attention-block matmuls
    (Q/K/V/out projections, feed-forward, proj_in/out) in FP8 e4m3 -- weights scaled per output channel once at
    load, activations per token at run time -- through torch._scaled_mm on GPUs of compute capability 8.9+ (Ada,
    Hopper); refused elsewhere. fp8-emulated: the same rounding, multiplied in fp32, on any device: slower than
    fp32, for measuring quality. Time embeddings, conv_in/conv_out, 3x3 convolutions, norms, the text encoders and
    the VAE stay in the model's dtype (why: engine/fp8.py). Cost (emulated, demo model, 20 steps): 43.5 dB PSNR and
    0.993 SSIM against fp32, the toy judge's conditioning rate 0.98 as for fp32 (bench.toy_quality); 42.1 dB /
    44.4 dB on sd15-arch / sdxl-arch at 256² (bench.lossy_arch). The GPU speed-up is not measured yet; the layers
    it quantizes hold 32% (SD 1.5, 512²) and 64% (SDXL, 1024²) of a UNet step's FLOPs, which bounds it. The fp16
    weights stay beside the e4m3 copy (LoRAs merge into them): memory grows by half of those layers' fp16 weights.
    Composes with LoRA (only the layers a switch writes are quantized again), CUDA graphs and --step-cache. Recorded
    in each frame's resume key and the manifest; torch backend only."""
    loras: tuple[tuple[str, float], ...] = ()
    """--lora FILE[:SCALE]: (file, scale) merged into every movie, before its style's and its own LoRAs."""
    quiet: bool = False

    @property
    def torch_device(self) -> torch.device:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda was requested but this machine has no usable CUDA device "
                            "(or torch was installed without CUDA)", "use --device cpu, or install a CUDA build "
                                                                     "of torch")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"unknown device {self.device!r}", "use --device cpu or --device cuda")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        name = self.dtype
        if name == "auto":
            name = "fp16" if self.torch_device.type == "cuda" else "fp32"
        if name not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}", "use fp32, fp16, bf16 or auto")
        return DTYPES[name]

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.torch_dtype]
