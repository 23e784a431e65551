"""Model families: what differs between SD 1.x/2.x/SDXL UNets, FLUX.1 and FLUX.2 [klein], behind one interface.

`render_batch` (engine/pipeline.py) is one numbered script for every model; at each step it asks the model's
family: which guidance batch to run, how prompts become conditioning, which schedule, how the initial noise is
laid out, how the result is handed to the decoder. Loading and checking a folder is the family's too
(`load`). A further family (SD3.5, Qwen-Image) is one more module here; docs/models.md says what it costs.

    family          kinds            denoiser                       text conditioning
    SD              sd, sdxl         UNet2DConditionModel           CLIP (SDXL: two, pooled + size ids)
    FLUX.1          flux1            FluxTransformer2DModel         CLIP-L pooled + T5 hidden states
    FLUX.2 [klein]  flux2-klein      Flux2Transformer2DModel        Qwen3 hidden states of three layers
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..backends.base import Backend
    from ..jobs import BatchSettings, FrameJob
    from ..text import PromptEncoder


class Family(Protocol):
    """One model family. Every method takes the loaded `ModelBundle` (engine.models) it is asked about."""

    name: str  # for messages: "SD 1.x/2.x", "SDXL", "FLUX.1", "FLUX.2 [klein]"
    kinds: tuple[str, ...]  # the ModelBundle.kind values it serves
    pipelines: tuple[str, ...]  # the model_index.json _class_name values it loads
    cuda_dtype: str  # what --dtype auto means on CUDA ("fp16", or "bf16" where fp16 overflows)
    no_style_training: str | None  # why style immobilization cannot train a token for it; None: it can

    def load(self, path, index: dict[str, Any], model_id: str, dtype, device, encoder_device=None) -> Any:
        """The folder as a ModelBundle, its modules loaded in `dtype` onto `device` (the text encoders onto
        `encoder_device`, default `device`); a UserError naming a missing or mismatched part."""

    def defaults(self, model) -> dict[str, Any]:
        """Render settings of the model's kind beyond its native size (steps, guidance, scheduler): the cascade's
        model layer, below the model folder's own movielm_defaults.json."""

    def check_config(self, config) -> None:
        """Refuse a ModelConfig option this family cannot run (a UserError), before the model loads."""

    def check(self, model, s) -> list[str]:
        """A movie's resolved RenderSettings: a UserError for what the family cannot render; else warnings to
        show once (settings the model ignores)."""

    def prompt_encoder(self, model, backend: Backend) -> PromptEncoder:
        """The prompt encoder for this model: tokenizers, embedding tables, the per-run prompt cache."""

    def cfg_scale(self, model, s: BatchSettings) -> float | None:
        """The classifier-free-guidance scale of a batch, or None: no negative batch at all."""

    def conditioning(self, model, encoder: PromptEncoder, jobs: list[FrameJob], s: BatchSettings,
                     cfg: bool) -> Any:
        """The denoiser's conditioning for the batch (CFG: negatives first), as backends.base defines it."""

    def scheduler(self, model, s: BatchSettings, device: torch.device) -> Any:
        """A fresh scheduler with its timesteps set for the batch."""

    def initial_latents(self, model, scheduler, seeds: list[int], s: BatchSettings, device: torch.device
                        ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each frame's noise, drawn exactly as diffusers draws it for that seed at batch size 1, laid out as the
        denoiser takes it; and the frames' generators (ancestral samplers draw from them later)."""

    def steps(self, scheduler, timesteps, generators) -> Any:
        """The stepper of the denoise loop (engine.schedulers)."""

    def unpack(self, model, latents: torch.Tensor, s: BatchSettings) -> torch.Tensor:
        """The denoised latents as the VAE decoder graph takes them: (B, C, h, w)."""

    lora_prefixes: tuple[tuple[str, ...], tuple[str, ...]]
    """The key prefixes of its LoRA files: (kohya/A1111 names, diffusers/PEFT names), engine.lora."""
    lora_folds_alphas: bool  # diffusers' converter of its kohya files applies their alphas itself

    def lora_state_dict(self, state: dict[str, torch.Tensor], model) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, float]]:
        """A LoRA file's tensors converted by diffusers' loader of the family to "component.module.lora_X" names,
        and the alphas diffusers returned by module name (or none)."""

    def a1111(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        """A frame's sampler and guidance as the web UIs write them in their "parameters" text (a frame's settings
        as run.images records them), in their order; None: AUTOMATIC1111's own Stable Diffusion pairs."""


def family_of(model) -> Family:
    """The family of a loaded ModelBundle."""
    return family_by_kind(model.kind)


def family_by_kind(kind: str) -> Family:
    """The family of a ModelBundle.kind (manifests and ModelInfo record the kind)."""
    for family in _families():
        if kind in family.kinds:
            return family
    raise ValueError(f"no model family serves kind {kind!r}")


def family_of_spec(spec) -> Family:
    """The family of the model `spec` names (--model), from its model_index.json alone: one small file, read
    before any weights load (a demo model's: the shipped one's). Stable Diffusion for single files and folders it
    cannot read (loading then says what is wrong with them)."""
    from ..demo import DEMOS

    folder = DEMOS[str(spec)][0] if str(spec) in DEMOS else Path(spec).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    return loader_for(index.get("_class_name", "") if isinstance(index, dict) else "") or family_by_kind("sd")


def all_families() -> tuple[Family, ...]:
    return _families()


def loader_for(class_name: str) -> Family | None:
    """The family whose pipeline class `class_name` is (model_index.json's _class_name); None: not one of the
    transformer families (engine.models then checks it as Stable Diffusion)."""
    return next((f for f in _families() if class_name in f.pipelines), None)


def _families() -> tuple[Family, ...]:
    # Imported on first use: the families import the text encoders' modules, which engine.models imports too.
    from .flux import FLUX1, FLUX2_KLEIN
    from .sd import SD

    return SD, FLUX1, FLUX2_KLEIN
