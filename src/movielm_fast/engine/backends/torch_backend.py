"""The PyTorch backend: the reference implementation every other backend is compared with.

It runs the very modules the exporter traces (export/graphs.py), so an exported graph and this backend compute the
same function by construction; what is added here is only placement (device, dtype, memory format) and the CUDA
launch optimizations.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch

from movielm_fast.errors import UserError
from movielm_fast.export.graphs import graph_modules
from movielm_fast.export.specs import TRANSFORMER, UNET, VAE_DECODER, component_dtype, text_encoder_component
from movielm_fast.kernels.attention import AttentionChoiceError, install_attention, sdpa_context

from .. import cpu, cuda_knobs
from ..config import torch_dtype
from ..consistency import AnchorState
from ..consistency import install as install_anchor_attention
from ..fp8 import quantize_unet, requantize_changed
from ..lora import TorchMerger
from ..oom import is_oom
from ..step_cache import CachedUNet, HookedTransformer, StepCacheRun
from .base import DiTCond, UNetCond, register
from .buckets import Bucket, pad_rows, padded_bucket, unet_bucket
from .cuda_graph import GraphedCallable

log = logging.getLogger("movielm_fast")


def vae_decode_dtype(model, device: torch.device, dtype_name: str) -> str:
    """The dtype the VAE decodes in. SD 1.x/2.x VAEs decode in fp16 on CUDA although their configs say
    `force_upcast` (diffusers' own SD 1.x/2.x pipelines ignore it; only its SDXL pipeline upcasts): the rare batch
    that overflows is decoded again in fp32 (`Fp32FallbackDecoder`). SDXL's VAE does overflow in fp16, so it stays
    fp32 unless it is an fp16-safe one (force_upcast false, e.g. the fp16-fix VAE); elsewhere as the exporter does."""
    if device.type == "cuda" and dtype_name == "fp16" and model.kind == "sd":
        return "fp16"
    return component_dtype(model, VAE_DECODER, dtype_name)


class Fp32FallbackDecoder:
    """Decode in fp16 or bf16; a batch whose image is not finite (an overflow: inf, and the NaN of inf - inf in the
    next normalization) is decoded again in fp32, said once per run. The fp32 copy of the decoder is made on the
    first fallback only, from the low-precision weights: the extra range, not extra accuracy, is what it is for.
    The check is one reduction and one host sync per decoded batch."""

    def __init__(self, eager: torch.nn.Module, fast: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.eager, self.fast = eager, fast or eager
        self.fp32: torch.nn.Module | None = None
        self.fallbacks = 0

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.fast(latents)
        if torch.isfinite(images.sum()):  # one reduction: clamped images can only hold NaN of an overflow
            return images
        if self.fp32 is None:
            self.fp32 = copy.deepcopy(self.eager).float()
        self.fallbacks += 1
        if self.fallbacks == 1:
            log.warning("the %s VAE decode overflowed (non-finite pixels): that batch and any later such batch "
                        "are decoded again in fp32", str(latents.dtype).removeprefix("torch."))
        return self.fp32(latents.float())


@register("torch")
class TorchBackend:
    name = "torch"

    def __init__(self, model, config):
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        graphs = graph_modules(model)
        # --offload-text-encoders: the encoders wait in host memory and visit the device to encode (encode_text).
        self.offload = config.offload_text_encoders
        self.encoder_home = torch.device("cpu") if self.offload else self.device
        self.encoders = [graphs[text_encoder_component(i)] for i in range(len(model.text_encoders))]
        for component, graph in graphs.items():
            dtype = vae_decode_dtype(model, self.device, config.dtype_name) if component == VAE_DECODER else \
                component_dtype(model, component, config.dtype_name)
            graph.to(self.encoder_home if graph in self.encoders else self.device, torch_dtype(dtype)).eval()
        # A partial bundle (a refiner, a swapped VAE: engine.models) lacks the VAE or the UNet. `unet` is the
        # denoiser's graph: a UNet's, or a transformer family's (FLUX: engine.families).
        self.unet, self.vae = graphs.get(UNET, graphs.get(TRANSFORMER)), graphs.get(VAE_DECODER)
        self.graphs = graphs
        self.lora_merger: TorchMerger | None = None  # made on the first LoRA set
        # bf16 on the CPU: the path engine/cpu.py's table gives this CPU's bf16 ability; eager elsewhere.
        self.fast = cpu.cpu_fast_path(self.device, self.dtype)
        channels_last = config.channels_last and (self.device.type == "cuda" or self.fast.channels_last)
        self.anchor_state: AnchorState | None = None  # installed on the first batch with character anchors
        self.cached_steps: dict[int, tuple] = {}  # step cache: depth -> (full step, shallow step), made on first use
        self.buckets: set[Bucket] = set()  # UNet call shapes captured or compiled so far (engine/backends/buckets)
        # Asked for by flag: consistency batches (eager only) are then an error; the default steps aside for them.
        self._explicit_capture = config.compile_unet or bool(config.cuda_graphs)
        self.knobs = self._knobs(model, config)
        if self.knobs["cudnn_benchmark"]:
            torch.backends.cudnn.benchmark = True  # per-shape algorithm search on first use (torch's own switch)
        try:  # the UNet's SDPA backend (not the VAE's: its one head is 512 wide, more than flash kernels take)
            self._sdpa = sdpa_context(self.knobs["sdpa_backend"])
        except AttentionChoiceError as exc:
            raise UserError(exc.message, exc.hint) from None
        if self.vae is not None:
            self.vae_dtype = torch_dtype(vae_decode_dtype(model, self.device, config.dtype_name))
            if channels_last:
                self.vae.to(memory_format=torch.channels_last)
            self._decode = cpu.CompiledCpu(self.vae, "VAE decoder") if self.fast.compile else self.vae
            if self.vae_dtype in (torch.float16, torch.bfloat16):
                self._decode = Fp32FallbackDecoder(self.vae, self._decode)
        self.fp8_layers: list[str] = []  # --quantize: the denoiser layers that run in FP8 (engine/fp8.py)
        self.fp8_requantized: list[str] = []  # and those the last LoRA switch quantized again
        # The diffusers module inside the denoiser's graph: a UNet, or a transformer family's transformer.
        self.denoiser = getattr(self.unet, "unet", None) or getattr(self.unet, "transformer", None)
        transformer = getattr(self.unet, "transformer", None)
        self.dit_cache = HookedTransformer(transformer) if transformer is not None else None  # --step-cache
        if self.unet is not None:
            self._setup_unet(config, channels_last)
            if config.quantize:  # after QKV fusion (the fused projections are what runs); graphs capture lazily
                self.fp8_layers = quantize_unet(self.denoiser, emulate=config.quantize == "fp8-emulated")

    def _setup_unet(self, config, channels_last: bool) -> None:
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        # The diffusers UNet inside the graph: attention and QKV fusion are set on it. A transformer's graph has
        # none: its family refuses other attention kernels, and its QKV projections stay apart (not yet measured).
        unet = getattr(self.unet, "unet", None)
        if config.attention != "sdpa":
            try:
                install_attention(unet, config.attention)
            except AttentionChoiceError as exc:
                raise UserError(exc.message, exc.hint) from None
        if unet is not None and self.device.type == "cuda" and config.fuse_qkv and config.attention == "sdpa":
            # One (3D x D) matmul instead of three: same arithmetic, fewer kernel launches. diffusers installs its
            # own fused SDPA processor for this, so it only combines with --attention sdpa.
            unet.fuse_qkv_projections()
        self._unet_step = self.unet
        if self.device.type == "cpu" and (config.compile_unet or self.fast.compile):
            self._unet_step = cpu.CompiledCpu(self.unet, "UNet")
        elif config.compile_unet:
            if config.cuda_graphs:
                raise UserError("--compile and --cuda-graphs both capture CUDA graphs", "choose one of them")
            # Inductor's FX-graph and autotuning caches in the project's cache root: the next process loads what
            # this one compiled (keyed by inductor on the graph, shapes, dtypes and torch version).
            cpu.use_compile_cache()
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._unet_step = torch.compile(self.unet, mode=mode, dynamic=False)
        elif self.knobs["cuda_graphs"]:
            self._unet_step = GraphedCallable(self.unet)

    def _knobs(self, model, config) -> dict:
        """The lossless CUDA knobs: flags as given, unset ones as measured (engine/cuda_knobs.py); on the CPU none
        of them applies."""
        given = {"cuda_graphs": config.cuda_graphs, "sdpa_backend": config.sdpa_backend,
                 "cudnn_benchmark": config.cudnn_benchmark}
        if self.device.type != "cuda":
            return {"cuda_graphs": False, "sdpa_backend": config.sdpa_backend, "cudnn_benchmark": False}
        return cuda_knobs.resolve(given, model.kind, torch.cuda.get_device_name(self.device))

    def set_loras(self, loras, library) -> None:
        if self.lora_merger is None:
            if not loras:
                return
            self.lora_merger = TorchMerger(library, self.graphs)
        before = self.lora_merger.current
        self.lora_merger.apply(loras, library)
        if self.fp8_layers and self.lora_merger.current != before:
            self.fp8_requantized = requantize_changed(self.denoiser)  # the merged weights are what gets quantized
        if self.lora_merger.current != before and isinstance(self._unet_step, cpu.CompiledCpu):
            # Inductor's freezing folded the previous weights into the compiled graphs as constants, and dynamo's
            # guards do not look at weight values: drop every compiled graph and compile against the merged ones.
            torch._dynamo.reset()
            self._unet_step = cpu.CompiledCpu(self.unet, "UNet")
            self.cached_steps.clear()

    @torch.inference_mode()
    def encode_text(self, encoder_index, inputs_embeds, eos_index):
        enc = self.encoders[encoder_index]
        if self.offload:
            enc.to(self.device)
        try:
            return enc(inputs_embeds.to(self.device, self.dtype), eos_index.to(self.device))
        finally:
            if self.offload:  # its outputs stay on the device; the weights leave
                enc.to(self.encoder_home)

    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: UNetCond | DiTCond) -> torch.Tensor:
        def cast(x):
            return None if x is None else x.to(self.device, self.dtype)

        def place(x):
            return None if x is None else x.to(self.device)

        if cond.anchors is not None:
            return self._denoise_anchored(cast(latents), t, cond, cast)
        t = torch.as_tensor(t, device=self.device).float().reshape(())  # 0-d device tensor: no host sync, graphable
        args = (cast(latents), t, *cond.graph_inputs(cast, place))
        rows = latents.shape[0]
        bucket = None
        if self._unet_step is not self.unet:  # captured or compiled: pad up to a bucket made before (backends/buckets)
            bucket = padded_bucket(unet_bucket(args[0], args[2]), self.buckets)
            batched = len(args) - cond.unbatched  # position ids have no rows to pad
            args = pad_rows(args[:batched], bucket[0]) + args[batched:]
        cached = cond.cache is not None or (self.dit_cache is not None and self.dit_cache.on)
        try:
            with self._sdpa():
                noise = self._denoise_cached(args, cond.cache) if cached else self._unet_step(*args)
        except Exception as exc:
            if bucket is not None and is_oom(exc):
                # The batch is about to be retried smaller (engine/oom.py): it must not be padded back up to this.
                self.buckets = {b for b in self.buckets if b[0] < bucket[0]}
            raise
        if bucket is not None:
            self.buckets.add(bucket)
        return noise[:rows] if noise.shape[0] != rows else noise  # a view: the stepper copies what it keeps

    def _denoise_cached(self, args: tuple, run: StepCacheRun | None) -> torch.Tensor:
        """Step caching (engine.step_cache): the whole UNet on full steps, keeping its deep features; the shallow
        layers alone in between. Both steps run the way the plain UNet step does (eager, compiled or graphed). A
        transformer: diffusers' cache hook, eager (`run` None: the first batch without a cache takes it off)."""
        if self.dit_cache is not None:
            return self.dit_cache(self.unet if run is not None else self._unet_step, args, run)
        depth = run.cache.depth
        if depth not in self.cached_steps:
            model = CachedUNet(self.unet.unet, depth)
            self.cached_steps[depth] = (self._like_unet_step(model.full, "UNet (full step)"),
                                        self._like_unet_step(model.shallow, "UNet (cached step)"))
        full, shallow = self.cached_steps[depth]
        if run.full_now():
            noise, run.features = full(*args)  # a graphed step's buffer: the shallow step copies it in, unchanged
        else:
            noise = shallow(*args, run.features)
        run.advance()
        return noise

    def _like_unet_step(self, fn, name: str):
        """`fn` wrapped as `_unet_step` wraps the UNet: compiled, captured as CUDA graphs, or eager."""
        if isinstance(self._unet_step, cpu.CompiledCpu):
            return cpu.CompiledCpu(fn, name)
        if isinstance(self._unet_step, GraphedCallable):
            return GraphedCallable(fn)
        if self._unet_step is not self.unet:
            return torch.compile(fn, mode="reduce-overhead" if self.device.type == "cuda" else None, dynamic=False)
        return fn

    def _denoise_anchored(self, latents, t, cond: UNetCond, cast) -> torch.Tensor:
        """Consistency mode: the anchor processors read which rows attend to which anchors from `anchor_state`;
        eager only (the rows' key lengths change from call to call)."""
        if self._unet_step is not self.unet and self._explicit_capture:
            raise UserError("consistency mode (anchor attention) cannot run with --cuda-graphs or --compile",
                            "drop --cuda-graphs/--compile for movies with consistency")
        if self.anchor_state is None:
            self.anchor_state = AnchorState()
            install_anchor_attention(self.unet.unet, self.anchor_state)
        self.anchor_state.batch, self.anchor_state.t = cond.anchors, int(t)
        try:
            with self._sdpa():
                return self.unet(latents, torch.as_tensor(t, device=self.device).float().reshape(()),
                                 cast(cond.encoder_hidden_states), cast(cond.text_embeds), cast(cond.time_ids),
                                 cast(cond.timestep_cond))
        finally:
            self.anchor_state.batch = None

    @property
    def vae_fallbacks(self) -> int:
        """Batches whose low-precision decode overflowed and were decoded again in fp32 (0 without a fallback)."""
        return getattr(self._decode, "fallbacks", 0) if self.vae is not None else 0

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents.to(self.device, self.vae_dtype))  # stays on the device: uint8 crosses to the host
