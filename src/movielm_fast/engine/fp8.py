"""FP8 (e4m3) matmuls for the denoiser's attention blocks: --quantize fp8, and fp8-emulated to measure its quality.

What is quantized: every nn.Linear, and every 1x1 nn.Conv2d, inside the UNet's transformer blocks ("attentions"
of the down, mid and up blocks) whose input and output widths are multiples of 16 (torch._scaled_mm's constraint):
the attention Q/K/V/out projections (and diffusers' fused QKV where it is fused), the feed-forward (GEGLU) layers,
and proj_in/proj_out (Linear on SDXL, 1x1 convolutions on SD 1.x). Those layers hold 32% of a full UNet step's
FLOPs on SD 1.5 at 512² and 64% on SDXL at 1024² (the rest: 3x3 convolutions and the attention products; counted
by `python -m movielm_fast.bench.lossy_arch`), which bounds what FP8 can gain: if time follows FLOPs, even at twice
the fp16 rate on those layers a step takes at least 84% (SD 1.5) / 68% (SDXL) of its fp16 time.
On a transformer family (FLUX.1, FLUX.2 [klein]) the same rule reads "inside its double and single blocks": every
Linear of both streams' attention (Q/K/V, the outputs, klein's fused QKV + MLP input), the feed-forwards and the
single blocks' MLP and output projections -- all but the attention products, whose share grows with the image
(bench/RESULTS.md, "DiT FP8 linears"; `python -m movielm_fast.bench.dit_accel`). Outside them, or kept: the AdaLN
modulation linears inside the blocks (one row per sample, and they scale whole streams), the embedders of the
latents, text, time and guidance (first layers), norm_out and proj_out (the last).
Weights: e4m3 with one scale per output channel, quantized once at load (and again for the layers a LoRA switch
writes); activations: e4m3 with one scale per row (token), computed at run time on the device (amax / 448: no
host sync, so the layers capture into CUDA graphs). Products accumulate in fp32, come out of torch._scaled_mm in
bf16 (its row-wise mode's output) and are cast to the model's dtype before the bias is added.

What stays in fp16 (the model's dtype), and why:
- the time embedding, SDXL's added (pooled text, size) embedding and every resnet's time_emb_proj: matmuls of one
  row per sample, so nothing to gain, and their outputs shift and scale whole feature maps, so errors spread;
- conv_in and conv_out: 4 channels (no tensor-core work worth the name), and the first and last layers are the
  most sensitive to rounding (TensorRT's and the literature's FP8 recipes keep them too);
- 3x3 convolutions (resnets, down/upsamplers) and the resnets' 1x1 shortcuts: PyTorch has no FP8 convolution, and
  the shortcuts are one per resolution change;
- GroupNorm/LayerNorm and the attention itself (softmax(QK^T)V in SDPA): normalisations and activation-activation
  products, no weights to quantize;
- the text encoders and the VAE: outside the denoising loop (once per prompt, once per frame).

Each layer keeps its fp16 weight: a LoRA merges into it (engine.lora.TorchMerger) and only the layers whose weight
was written are quantized again (`requantize_changed`); with gradients on (style training), the layers run the
fp16 weight, so learned tokens do not depend on --quantize. FP8 runs through torch._scaled_mm on CUDA GPUs of
compute capability 8.9 or more (Ada, Hopper, Blackwell); `fp8-emulated` rounds weights, activations and products
exactly as the GPU path does and multiplies in fp32 anywhere (slower than plain fp32: it measures, it does not
accelerate). The CPU build of torch runs torch._scaled_mm too (dequantize, fp32 GEMM, round): the tests run the
GPU path's code there by setting a layer's `emulate` to False, which users cannot do (--quantize fp8 is refused
on the CPU: it would be slower than fp32 and no more exact than the emulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from movielm_fast.errors import UserError
from movielm_fast.kernels.scaled_mm import E4M3, fp8_matmul, fp8_matmul_ref, quantize_rows

from .config import QUANTIZE_MODES

FP8_CAPABILITY = (8, 9)


def check_quantize(mode: str | None, backend: str, device: torch.device) -> None:
    """Refuse --quantize where it cannot run, before any model loads."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown --quantize {mode!r}", f"use one of: {', '.join(QUANTIZE_MODES)}")
    if backend != "torch":
        raise UserError(f"--quantize {mode} needs --backend torch", "use --backend torch, or drop --quantize")
    if mode == "fp8-emulated":
        return
    if device.type != "cuda":
        raise UserError("--quantize fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, "
                        "Hopper, Blackwell); this run is on the CPU",
                        "drop --quantize, or use --quantize fp8-emulated to measure its image quality on the CPU "
                        "(slower than plain fp32)")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--quantize fp8 needs FP8 tensor cores (compute capability 8.9+); {name} has "
                        f"{capability[0]}.{capability[1]}", "drop --quantize on this GPU (fp16 is its fastest path)")


class _Fp8Weight:
    """What both FP8 layer types share: the e4m3 copy of the weight, its scales, and the matmul."""

    weight: nn.Parameter
    emulate: bool

    def _init_fp8(self, emulate: bool) -> None:
        n = self.weight.shape[0]
        self.emulate = emulate
        self.register_buffer("weight_fp8", torch.empty(n, self.weight[0].numel(), dtype=E4M3,
                                                       device=self.weight.device), persistent=False)
        self.register_buffer("weight_scale", torch.empty(1, n, device=self.weight.device), persistent=False)
        self.requantize()

    def requantize(self) -> None:
        """Quantize the (fp16) weight again, in place: captured CUDA graphs and compiled steps see the new values."""
        with torch.no_grad():
            q, scale = quantize_rows(self.weight.reshape(self.weight.shape[0], -1))  # per output channel
            self.weight_fp8.copy_(q)
            self.weight_scale.copy_(scale.t())
        self.quantized_version = self.weight._version  # in-place writes (a LoRA merge) bump it

    def fp8_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in x's dtype, bias added."""
        y = (fp8_matmul_ref if self.emulate else fp8_matmul)(x2d, self.weight_fp8, self.weight_scale).to(x2d.dtype)
        return y + self.bias if self.bias is not None else y


class Fp8Linear(_Fp8Weight, nn.Linear):
    """nn.Linear with an e4m3 copy of its weight; the weight Parameter itself is the model's (shared, not copied)."""

    def __init__(self, linear: nn.Linear, emulate: bool):
        nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self._init_fp8(emulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training (style immobilization) sees the fp16 model
            return F.linear(x, self.weight, self.bias)
        y = self.fp8_forward(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)


class Fp8Conv1x1(_Fp8Weight, nn.Conv2d):
    """A 1x1 convolution as an FP8 matmul over channels (NHWC rows: a view under channels_last)."""

    def __init__(self, conv: nn.Conv2d, emulate: bool):
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self._init_fp8(emulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.conv2d(x, self.weight, self.bias)
        b, c, h, w = x.shape
        y = self.fp8_forward(x.permute(0, 2, 3, 1).reshape(-1, c))  # (B*H*W, C)
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, N, H, W)


_BLOCKS = (".attentions.", ".transformer_blocks.", ".single_transformer_blocks.")  # a UNet's, a DiT's blocks
_MODULATION = ".norm"  # a DiT block's AdaLN linears (norm1.linear, norm1_context.linear, norm.linear)


def fp8_candidates(unet: nn.Module) -> dict[str, nn.Module]:
    """name -> layer to quantize (see the module docstring for which and why); `unet` a UNet or a transformer."""
    out = {}
    unused = _fused_away(unet)
    for name, m in unet.named_modules():
        path = f".{name}"
        if not any(b in path for b in _BLOCKS) or _MODULATION in path or isinstance(m, _Fp8Weight) or name in unused:
            continue
        if isinstance(m, nn.Conv2d) and not (m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
                                             and m.padding in ((0, 0), 0)):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] % 16 == 0 and m.weight.shape[1] % 16 == 0:
            out[name] = m
    return out


def _fused_away(unet: nn.Module) -> set[str]:
    """Projections that diffusers' fused QKV (fuse_qkv_projections) replaced by to_qkv / to_kv: they stay only as
    the fp16 weights LoRAs merge into (the merger copies them into the fused ones), so they need no e4m3 copy."""
    out = set()
    for name, m in unet.named_modules():
        if getattr(m, "fused_projections", False):
            parts = ("to_q", "to_k", "to_v") if getattr(m, "to_qkv", None) is not None else ("to_k", "to_v")
            out |= {f"{name}.{p}" for p in parts}
    return out


def quantize_unet(unet: nn.Module, emulate: bool) -> list[str]:
    """Swap the chosen layers for their FP8 versions in place (same parameters); returns their names."""
    names = []
    for name, m in fp8_candidates(unet).items():
        parent, _, child = name.rpartition(".")
        new = Fp8Conv1x1(m, emulate) if isinstance(m, nn.Conv2d) else Fp8Linear(m, emulate)
        setattr(unet.get_submodule(parent) if parent else unet, child, new)
        names.append(name)
    return names


def requantize_changed(unet: nn.Module) -> list[str]:
    """Quantize again the FP8 layers whose fp16 weight was written since they were quantized (a LoRA merged or
    restored); returns their names."""
    changed = [name for name, m in unet.named_modules()
               if isinstance(m, _Fp8Weight) and m.weight._version != m.quantized_version]
    for name in changed:
        unet.get_submodule(name).requantize()
    return changed
