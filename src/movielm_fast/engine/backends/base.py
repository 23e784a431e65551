"""The Backend protocol: what differs between torch, ONNX Runtime and TensorRT -- and nothing else.

The pipeline owns prompt handling, classifier-free-guidance batching and the scheduler, so no stage of it ever
asks which backend it is talking to.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from movielm_fast.engine.cpu import use_threads
from movielm_fast.errors import UserError


@dataclass
class UNetCond:
    """Conditioning for one denoise call, already batched (CFG: negatives first, then positives)."""

    encoder_hidden_states: torch.Tensor  # (B, tokens, D)
    text_embeds: torch.Tensor | None = None  # (B, P)  SDXL pooled text embedding
    time_ids: torch.Tensor | None = None  # (B, 6)   SDXL size/crop conditioning
    timestep_cond: torch.Tensor | None = None  # (B, P) guidance embedding of guidance-distilled (LCM) UNets
    anchors: Any = None  # engine.consistency.AnchorBatch: character anchors (torch backend only)
    cache: Any = None  # engine.step_cache.StepCacheRun: this batch's step cache (torch backend only)

    unbatched = 0  # trailing graph inputs without a batch axis (none)
    latents_input = "sample"  # the exported UNet's name for the latents

    def to(self, device) -> "UNetCond":
        return UNetCond(*(None if x is None else x.to(device) for x in (
            self.encoder_hidden_states, self.text_embeds, self.time_ids, self.timestep_cond)))

    def graph_inputs(self, cast: Callable, place: Callable) -> tuple:
        """The UNet graph's inputs after (sample, timestep), in its order (export/graphs.py): `cast` places a
        tensor in the model's dtype, `place` only on its device."""
        return cast(self.encoder_hidden_states), cast(self.text_embeds), cast(self.time_ids), cast(self.timestep_cond)

    def feeds(self) -> dict[str, torch.Tensor]:
        """The exported UNet's inputs by name, after sample and timestep (export/specs.py)."""
        feeds = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            feeds.update(text_embeds=self.text_embeds, time_ids=self.time_ids)
        return feeds


@dataclass
class DiTCond:
    """Conditioning of one transformer call (FLUX.1, FLUX.2 [klein]), already batched (CFG: negatives first)."""

    encoder_hidden_states: torch.Tensor  # (B, L, D) text tokens (T5's, or Qwen3's three layers side by side)
    txt_ids: torch.Tensor  # (L, 3 or 4) float32 rotary position ids of the text tokens: no batch axis
    img_ids: torch.Tensor  # (N, 3 or 4) float32 rotary position ids of the image tokens: no batch axis
    pooled: torch.Tensor | None = None  # (B, P) FLUX.1: CLIP's pooled embedding
    guidance: torch.Tensor | None = None  # 0-d float32: FLUX.1 [dev]'s embedded (distilled) guidance
    anchors: Any = None  # always None: the transformer families refuse consistency mode (engine.families.flux)
    cache: Any = None  # always None: and the step cache

    unbatched = 2  # txt_ids, img_ids: the last graph inputs
    latents_input = "hidden_states"  # the exported transformer's name for the packed latents

    def to(self, device) -> "DiTCond":
        return DiTCond(*(None if x is None else x.to(device) for x in (
            self.encoder_hidden_states, self.txt_ids, self.img_ids, self.pooled, self.guidance)))

    def graph_inputs(self, cast: Callable, place: Callable) -> tuple:
        """The transformer graph's inputs after (hidden_states, timestep), in its order (export/graphs.py). Position
        ids and guidance keep float32: bf16 would round the ids of a 512-token text."""
        return (cast(self.encoder_hidden_states), cast(self.pooled), place(self.guidance), place(self.txt_ids),
                place(self.img_ids))

    def feeds(self) -> dict[str, torch.Tensor]:
        """The exported transformer's inputs by name, after hidden_states and timestep (export/specs.py)."""
        feeds = {"encoder_hidden_states": self.encoder_hidden_states, "txt_ids": self.txt_ids, "img_ids": self.img_ids}
        if self.pooled is not None:
            feeds["pooled_projections"] = self.pooled
        if self.guidance is not None:
            feeds["guidance"] = self.guidance.reshape(1)
        return feeds


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype

    def encode_text(self, encoder_index: int, inputs_embeds: torch.Tensor, eos_index: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
        """(B, tokens, D) token embeddings -> text encoder i's outputs as its spec names them (export/specs.py):
        CLIP's (last hidden, penultimate hidden, pooled); T5's and Qwen3's (hidden,). `eos_index`: CLIP's EOS
        position per row; Qwen3's count of real tokens (the rest is padding, masked); T5 reads none. B: prompt
        windows, of several prompts at once (a backend with a `text_rows` attribute takes at most that many)."""

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: UNetCond | DiTCond) -> torch.Tensor:
        """One denoiser evaluation: a UNet's (B, C, h, w) latents at timestep t -> noise (or v) prediction; a
        transformer's packed (B, N, C) latents -> velocity; same shape."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) float images in [0, 1] (clamped), on the backend's device
        or the CPU: the pipeline converts them to uint8 where they are."""

    def set_loras(self, loras: tuple, library: Any) -> None:
        """Make the weights those of the base model plus the LoRA set `loras` (engine.lora.LoraSet; () = the plain
        model), merged, so they cost nothing per step; `library` (engine.lora.LoraLibrary) reads the files. A no-op
        when the set is the one already merged."""


def text_feeds(input_names: list[str], inputs_embeds: torch.Tensor, eos_index: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """An exported text encoder's inputs by its spec's names: CLIP reads the EOS position, Qwen3 the count of real
    tokens (the same per-row numbers, see `Backend.encode_text`), T5 neither."""
    given = {"inputs_embeds": inputs_embeds, "eos_index": eos_index.long(), "lengths": eos_index.long()}
    return {name: given[name] for name in input_names}


def denoise_feeds(latents: torch.Tensor, t, cond: UNetCond | DiTCond) -> dict[str, torch.Tensor]:
    """An exported denoiser's inputs by name (export/specs.py): the latents, the timestep as (1,) float32, and the
    conditioning's own."""
    return {cond.latents_input: latents, "timestep": torch.as_tensor(t).reshape(1).float(), **cond.feeds()}


def refuse_anchors(cond: UNetCond | DiTCond, backend: str) -> None:
    """Exported graphs have no anchor-attention variant (yet): say so instead of silently rendering without."""
    if cond.anchors is not None:
        raise UserError(f"consistency mode (anchor attention) needs --backend torch; {backend} has no such graph",
                        "render movies with consistency on --backend torch, or set their consistency mode to none")


_REGISTRY: dict[str, Callable[..., Backend]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


BUILTIN = {"torch": "torch_backend", "null": "null_backend", "onnxruntime": "onnx_backend",
           "tensorrt": "tensorrt_backend"}
"""Backend name -> the module that registers it, imported when the backend is first asked for (a torch run does not
pay for the exporters' modules)."""


def backend_names() -> list[str]:
    for name in BUILTIN:
        _import_builtin(name)
    return sorted(_REGISTRY)


def create_backend(name: str, model, config) -> Backend:
    """Backend `name` for `model`, configured by `config` (engine.config.BackendConfig). Torch's CPU threads are
    set here, for every backend: the scheduler and the latents are torch's work whichever backend runs the model."""
    _import_builtin(name)
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}", f"choose one of: {', '.join(backend_names())}")
    denoiser = getattr(model, "unet", None)
    denoiser = denoiser if denoiser is not None else getattr(model, "transformer", None)
    if denoiser is not None:  # a VAE alone (a swapped VAE) runs on the threads its model's backend chose
        use_threads(config.threads, sum(p.numel() for p in denoiser.parameters()))
    return _REGISTRY[name](model, config)


def _import_builtin(name: str) -> None:
    # Importing a backend module registers it. They import `register` from here, hence imports on first use, not at
    # the top. None needs its optional runtime to import: a missing onnxruntime or tensorrt is a UserError on use.
    if name in BUILTIN and name not in _REGISTRY:
        importlib.import_module(f"{__package__}.{BUILTIN[name]}")
