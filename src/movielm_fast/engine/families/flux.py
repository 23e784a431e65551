"""FLUX.1 ([schnell], [dev]) and FLUX.2 [klein]: flow-matching diffusion transformers.

What each reproduces of diffusers' own pipelines (FluxPipeline, Flux2KleinPipeline), so that a frame is the one
diffusers renders for the same prompt, seed, steps, size and guidance:

- noise: each frame's generator draws at batch size 1 what the pipeline draws for it with a list of generators.
  FLUX.1 draws (C, h, w) latents and packs each 2x2 patch into a token of 4C; FLUX.2 draws the patchified latents
  (4C, h/2, w/2) directly and flattens them into tokens. Either way one token per 16x16 pixels.
- schedule: the model's FlowMatchEulerDiscreteScheduler, sigmas evenly from 1 to 1/steps, shifted by `mu` from the
  image token count (FLUX.1: linear between its config's base and max shift, where the config asks for dynamic
  shifting; FLUX.2: BFL's empirical fit of token count and steps).
- guidance: FLUX.1 [dev] embeds the guidance (one forward per step); [schnell] has no guidance input. Either runs
  true CFG against the negative prompt when `true_cfg` > 1 (a second pass per step, in the same batch). FLUX.2
  [klein] base runs CFG when guidance > 1 (the negative prompt: diffusers' empty one unless the plan gives one);
  the step-distilled klein ignores guidance.
- text: engine.families.flux_text (CLIP-L pooled + T5 at 512 tokens; Qwen3's layers 9, 18, 27 at 512 tokens).
- decode: FLUX.1's VAE shift and scale; FLUX.2's VAE batch-norm statistics and unpatchify (export/graphs.py).

Not yet for these families (a clear error each): the SDXL refiner, a swapped VAE, the plan's other schedulers and
timestep spacings, the consistency mode anchor_attention (character_token works where the family's tokens train),
other attention kernels. docs/models.md has the table.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from movielm_fast.errors import UserError
from movielm_fast.export.specs import DIT_TEXT_TOKENS, QWEN3_LAYERS, TOKENS

from ..backends.base import DiTCond
from ..schedulers import FlowSteps, make_scheduler
from ..seeds import initial_latents
from ..step_cache import check_dit_depth
from .flux_text import DiTPromptEncoder, TextRole

PATCH = 2  # latent pixels per token side: each token is a 2x2 patch of latents


def flux1_mu(image_tokens: int, config: dict[str, Any]) -> float:
    """FLUX.1's shift of the schedule: linear in the image token count, from base_shift at base_image_seq_len to
    max_shift at max_image_seq_len (defaults as diffusers' FluxPipeline reads the scheduler config)."""
    n0, n1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    mu0, mu1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return mu0 + (mu1 - mu0) * (image_tokens - n0) / (n1 - n0)


# BFL's empirical shift for FLUX.2 (diffusers' compute_empirical_mu): mu is linear in the image token count at 10 and at
# 200 steps, and linear in the steps between them; above 4300 tokens the 200-step line alone.
_MU_10_STEPS = (8.73809524e-05, 1.89833333)
_MU_200_STEPS = (0.00016927, 0.45666666)


def flux2_mu(image_tokens: int, steps: int) -> float:
    at_200 = _MU_200_STEPS[0] * image_tokens + _MU_200_STEPS[1]
    if image_tokens > 4300:
        return float(at_200)
    at_10 = _MU_10_STEPS[0] * image_tokens + _MU_10_STEPS[1]
    return float(at_10 + (at_200 - at_10) * (steps - 10) / 190.0)


class FlowFamily:
    """What FLUX.1 and FLUX.2 [klein] share; each subclass says its parts, text encoders, noise layout and shift."""

    name = ""
    kinds: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()
    parts: dict[str, tuple[str, ...]] = {}  # model_index.json entry -> the class names it may hold
    encoders: tuple[tuple[str, str, Any, TextRole], ...] = ()  # (encoder folder, tokenizer folder, class, role)
    position_axes = 3  # rotary position id axes
    cuda_dtype = "bf16"  # what --dtype auto means on CUDA: FLUX's activations overflow fp16
    no_style_training: str | None = (
        "style immobilization trains a token for Stable Diffusion and FLUX.1; for FLUX.2 [klein] it is not done yet "
        "(docs/models.md)")

    # --- loading ----------------------------------------------------------------------------------------------------
    def load(self, path: Path, index: dict[str, Any], model_id: str, dtype, device, encoder_device=None):
        from .. import models

        encoder_device = device if encoder_device is None else encoder_device
        self._check_index(path, index)
        configs = {part: _read_config(path, part) for part in ("transformer", "vae", *(e[0] for e in self.encoders))}
        self._check_parts(path, configs)
        transformer_cls, vae_cls = self._module_classes()
        seconds: dict[str, float] = {}
        with ThreadPoolExecutor(2, thread_name_prefix="movielm-load") as pool:
            hashed = pool.submit(models._timed, seconds, "content_hash", models.content_hash, path)
            tokenized = pool.submit(models._timed, seconds, "model_tokenizers", lambda: [
                models._load_tokenizer(path, tok, _tokenizer_class(enc_cls)) for _, tok, enc_cls, _ in self.encoders])
            t0 = time.perf_counter()
            try:
                encoders = [models._load(enc_cls, path, folder, dtype, encoder_device) for folder, _, enc_cls, _
                            in self.encoders]
                transformer = models._load(transformer_cls, path, "transformer", dtype, device)
                vae = models._load(vae_cls, path, "vae", models._vae_load_dtype(path, dtype), device)
                seconds["model_weights"] = time.perf_counter() - t0
            finally:  # a broken component's UserError wins; the threads end either way
                tokenizers, digest = tokenized.result(), hashed.result()
        scheduler_config = models._read_scheduler_config(path)
        return models.ModelBundle(
            kind=self.kinds[0], model_id=model_id, path=path, content_hash=digest, unet=None, vae=vae,
            text_encoders=encoders, tokenizers=tokenizers, scheduler_config=scheduler_config,
            load_seconds=seconds, transformer=transformer, distilled=bool(index.get("is_distilled", False)))

    def _check_index(self, path: Path, index: dict[str, Any]) -> None:
        """Every part the pipeline needs is named in model_index.json, with a class of the family, and is there."""
        pipeline = index.get("_class_name", "")
        for part, classes in self.parts.items():
            entry = index.get(part)
            cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            hint = f"a {self.name} folder as {pipeline}.save_pretrained writes it has {part}/ with a {classes[0]}: " \
                   f"copy it from the model's original release"
            if cls is None:
                raise UserError(f"{path} is a {pipeline} folder without its {part} ({part!r} in model_index.json "
                                f"is {entry!r})", hint)
            if cls not in classes:
                raise UserError(f"{path}: the {part} of this {pipeline} folder is a {cls}, not a "
                                f"{' or '.join(classes)}", hint)
            if not (path / part).is_dir():
                raise UserError(f"{path} has no {part}/ folder, which its model_index.json names", hint)

    def _check_parts(self, path: Path, configs: dict[str, dict[str, Any]]) -> None:
        """The parts fit each other (read from their config.json files, before any weights load)."""
        t, vae = configs["transformer"], configs["vae"]
        _fits(path, "transformer", t["in_channels"], "vae", 4 * vae["latent_channels"],
              "input channels (4 per latent channel of the VAE: 2x2 patches)")
        for folder, _, _, role in self.encoders:
            width = self._text_width(configs[folder], role)
            if width is not None:
                _fits(path, "transformer", self._text_input(t, role), folder, width, f"{role.name} text width")

    def _module_classes(self):
        raise NotImplementedError

    def _text_width(self, config: dict[str, Any], role: TextRole) -> int | None:
        raise NotImplementedError

    def _text_input(self, transformer_config: dict[str, Any], role: TextRole) -> int:
        raise NotImplementedError

    # --- settings ---------------------------------------------------------------------------------------------------
    def defaults(self, model) -> dict[str, Any]:
        steps, guidance = self._steps_and_guidance(model)
        return {"steps": steps, "guidance": guidance, "scheduler": "default"}

    def _steps_and_guidance(self, model) -> tuple[int, float]:
        raise NotImplementedError

    def check_config(self, config) -> None:
        if config.step_cache not in (None, 1):
            check_dit_depth(config.step_cache_depth)
        not_yet = [(config.attention != "sdpa", f"--attention {config.attention}"),
                   (config.consistency == "anchor_attention" or
                    (config.consistency == "character_token" and self.no_style_training),
                    f"--consistency {config.consistency}")]
        for used, flag in not_yet:
            if used:
                raise UserError(f"{flag} is not available for {self.name} yet (docs/models.md has what each model "
                                "family supports)", f"drop {flag.split()[0]} for this model")
        if config.dtype == "fp16":
            raise UserError(f"{self.name} overflows in fp16 (its transformer's activations exceed fp16's range)",
                            "use --dtype bf16, or --dtype auto (bf16 on CUDA, fp32 on the CPU)")

    def check(self, model, s) -> list[str]:
        """A movie's resolved settings on this model: errors for what the family cannot render, warnings for what
        it ignores."""
        hint = "leave it unset for this model, or render this movie with a Stable Diffusion model"
        if s.scheduler != "default":
            raise UserError(f"{self.name} samples with its own flow-matching Euler scheduler; scheduler "
                            f"{s.scheduler!r} is for Stable Diffusion", "set scheduler to default (or leave it "
                                                                        "unset: the model's default is default)")
        for name in ("timestep_spacing", "refiner", "vae"):
            if getattr(s, name):
                raise UserError(f"{name} {getattr(s, name)!r} is not available for {self.name} (docs/models.md)", hint)
        mode = s.consistency.mode if s.consistency is not None else "none"
        # anchor_attention's records hook a UNet's attention processors. A character's learned token is words, which
        # a transformer reads as any prompt, wherever the family's tokens can be trained (style.characters).
        if mode == "anchor_attention" or (mode == "character_token" and self.no_style_training):
            fix = "use consistency mode character_token, or none" if not self.no_style_training else \
                "set the movie's consistency mode to none"
            raise UserError(f"consistency mode {mode!r} is not available for {self.name} (docs/models.md)", fix)
        side = model.vae_scale_factor * PATCH
        for name in ("width", "height"):
            value = getattr(s, name)
            if value % side:
                raise UserError(f"{name} {value} is not a multiple of {side}: {self.name} turns each 2x2 patch of "
                                f"its 1/{model.vae_scale_factor} latents into one token",
                                f"use {value - value % side} or {value - value % side + side}")
        return self._ignored(model, s)

    def _ignored(self, model, s) -> list[str]:
        return []

    # --- the render script's steps ----------------------------------------------------------------------------------
    def prompt_encoder(self, model, backend, tokenizers=None) -> DiTPromptEncoder:
        # A tokenizer whose model_max_length is below the family's length sets the model's (the DiT demo's T5: 40
        # tokens; diffusers' max_sequence_length); FLUX.1's T5 says 512, Qwen3's and a bare tokenizer's say more.
        roles = tuple(replace(role, length=min(role.length, tok.model_max_length))
                      for (*_, role), tok in zip(self.encoders, model.tokenizers))
        return DiTPromptEncoder(model, backend, roles, tokenizers)

    def conditioning(self, model, encoder: DiTPromptEncoder, jobs, s, cfg: bool) -> DiTCond:
        if cfg:  # negatives first, as the UNet families batch them
            pairs = encoder.encode_pairs([(j.prompt, j.negative_prompt) for j in jobs], s.loras)
            conds = [neg for neg, _ in pairs] + [pos for _, pos in pairs]
        else:  # no negative batch: its prompts are not encoded at all
            conds = encoder.encode_many([(j.prompt, 1) for j in jobs], s.loras)
        hidden = torch.cat([c.hidden for c in conds])  # (B or 2B, L, D)
        pooled = torch.cat([c.pooled for c in conds]) if conds[0].pooled is not None else None  # (B or 2B, P)
        guidance = torch.tensor(float(s.guidance)) if model.transformer.config.guidance_embeds else None
        txt_ids = torch.zeros(hidden.shape[1], self.position_axes)
        txt_ids[:, self.position_axes - 1] = self._text_positions(hidden.shape[1])
        return DiTCond(hidden, txt_ids, self._image_ids(model, s), pooled, guidance)

    def _text_positions(self, tokens: int) -> torch.Tensor:
        return torch.zeros(tokens)  # FLUX.1: all text tokens at position 0

    def _image_ids(self, model, s) -> torch.Tensor:
        """(N, axes) position ids of the image tokens: (0, row, column[, 0]), rows outermost."""
        h, w = self._token_grid(model, s)
        ids = torch.zeros(h, w, self.position_axes)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(h * w, self.position_axes)

    def _token_grid(self, model, s) -> tuple[int, int]:
        side = model.vae_scale_factor * PATCH
        return s.height // side, s.width // side

    def scheduler(self, model, s, device):
        # Always the model's own scheduler class ("default"): check() refused every other name.
        scheduler = make_scheduler("default", model.scheduler_config)
        h, w = self._token_grid(model, s)
        mu = self._mu(h * w, s.steps, scheduler.config)
        if scheduler.config.get("use_flow_sigmas"):  # the config's own sigmas, as the pipelines leave them
            scheduler.set_timesteps(s.steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / s.steps, s.steps), device=device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    def _mu(self, image_tokens: int, steps: int, config) -> float:
        raise NotImplementedError

    def initial_latents(self, model, scheduler, seeds, s, device):
        h, w = self._token_grid(model, s)
        channels = int(model.transformer.config.in_channels)  # per token: 4 latent channels x a 2x2 patch
        latents, generators = initial_latents(seeds, self._noise_shape(channels, h, w))
        return self._pack(latents, h, w).to(device), generators

    def steps(self, scheduler, timesteps, generators):
        return FlowSteps(scheduler, timesteps)

    def unpack(self, model, latents, s):
        return self._unpack(latents, *self._token_grid(model, s))

    # kohya: BFL's block names (lora_unet_double_blocks_0_img_attn_qkv), or diffusers' (lora_transformer_...)
    lora_prefixes = (("lora_unet_", "lora_te_", "lora_te1_", "lora_transformer_"), ("transformer.", "text_encoder."))
    lora_folds_alphas = True  # diffusers' FLUX converters scale kohya factors by alpha / r themselves (some in place)

    def lora_state_dict(self, state, model):
        converted = self._lora_mixin().lora_state_dict(state, **self._lora_kwargs)
        converted, alphas = converted if isinstance(converted, tuple) else (converted, {})
        return converted, {k.removesuffix(".alpha"): float(v) for k, v in (alphas or {}).items()}

    _lora_kwargs: dict[str, Any] = {}

    def a1111(self, settings):
        # As Forge writes FLUX frames: its Euler sampler on the model's shifted ("Simple") schedule.
        return {"Sampler": "Euler", "Schedule type": "Simple", "CFG scale": settings["guidance"]}


class Flux1Family(FlowFamily):
    name = "FLUX.1"
    kinds = ("flux1",)
    pipelines = ("FluxPipeline",)
    parts = {"transformer": ("FluxTransformer2DModel",), "vae": ("AutoencoderKL",),
             "text_encoder": ("CLIPTextModel",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
             "text_encoder_2": ("T5EncoderModel",), "tokenizer_2": ("T5TokenizerFast", "T5Tokenizer"),
             "scheduler": ("FlowMatchEulerDiscreteScheduler",)}

    embedding_keys = ("clip_l", "t5")  # a textual-inversion file's tensors, one per text encoder
    no_style_training = None  # style/training.py learns its CLIP and T5 vectors by flow matching

    @property
    def encoders(self):
        from transformers import CLIPTextModel, T5EncoderModel

        return (("text_encoder", "tokenizer", CLIPTextModel, TextRole("CLIP", TOKENS, pooled=True)),
                ("text_encoder_2", "tokenizer_2", T5EncoderModel, TextRole("T5", DIT_TEXT_TOKENS)))

    def _module_classes(self):
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        return FluxTransformer2DModel, AutoencoderKL

    _lora_kwargs = {"return_alphas": True}

    def _lora_mixin(self):
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

        return FluxLoraLoaderMixin

    def _text_width(self, config, role):
        return config.get("hidden_size") if role.pooled else config.get("d_model")

    def _text_input(self, transformer_config, role):
        return transformer_config["pooled_projection_dim" if role.pooled else "joint_attention_dim"]

    def _steps_and_guidance(self, model):
        # [dev]: FluxPipeline's own defaults (28 steps, guidance 3.5); [schnell]: 4 steps, no guidance input.
        return (28, 3.5) if model.transformer.config.guidance_embeds else (4, 0.0)

    def _ignored(self, model, s) -> list[str]:
        out = []
        true_cfg = s.true_cfg or 1.0
        if s.negative_prompt and true_cfg <= 1:
            out.append(f"{self.name} ignores the negative prompt unless true_cfg is above 1 (--true-cfg, e.g. 4: a "
                       "second transformer pass per step)")
        if not model.transformer.config.guidance_embeds and s.guidance > 1:
            out.append(f"{self.name} [schnell] has no guidance input: guidance {s.guidance} is ignored (true_cfg "
                       "runs classifier-free guidance)")
        return out

    def cfg_scale(self, model, s) -> float | None:
        return s.true_cfg if s.true_cfg > 1 else None

    def training_inputs(self, model, latents: torch.Tensor, text_tokens: int):
        """Style training (style/training.py): VAE latents (B, C, H, W), shifted and scaled -> (tokens, txt_ids,
        img_ids) as a render hands them to the transformer."""
        h, w = latents.shape[-2] // PATCH, latents.shape[-1] // PATCH
        txt_ids = torch.zeros(text_tokens, self.position_axes)
        grid = SimpleNamespace(height=latents.shape[-2] * model.vae_scale_factor,
                               width=latents.shape[-1] * model.vae_scale_factor)
        return self._pack(latents, h, w), txt_ids, self._image_ids(model, grid)

    def a1111(self, settings):
        # Forge's FLUX.1 pair: "CFG scale" is the true CFG (1: off), "Distilled CFG Scale" the embedded guidance.
        return {**super().a1111(settings), "CFG scale": settings.get("true_cfg", 1.0),
                "Distilled CFG Scale": settings["guidance"]}

    def _mu(self, image_tokens, steps, config):
        return flux1_mu(image_tokens, config)

    def _noise_shape(self, channels, h, w):
        return channels // 4, h * PATCH, w * PATCH

    def _pack(self, latents, h, w):
        b, c = latents.shape[:2]
        x = latents.view(b, c, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
        return x.reshape(b, h * w, c * PATCH * PATCH)

    def _unpack(self, latents, h, w):
        b, _, c4 = latents.shape
        x = latents.view(b, h, w, c4 // 4, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
        return x.reshape(b, c4 // 4, h * PATCH, w * PATCH)


class Flux2KleinFamily(FlowFamily):
    name = "FLUX.2 [klein]"
    kinds = ("flux2-klein",)
    pipelines = ("Flux2KleinPipeline",)
    parts = {"transformer": ("Flux2Transformer2DModel",), "vae": ("AutoencoderKLFlux2",),
             "text_encoder": ("Qwen3ForCausalLM", "Qwen3Model"),
             "tokenizer": ("Qwen2TokenizerFast", "Qwen2Tokenizer"), "scheduler": ("FlowMatchEulerDiscreteScheduler",)}
    position_axes = 4

    embedding_keys = ("qwen3",)

    @property
    def encoders(self):
        from transformers import Qwen3Model

        # Qwen3Model, not the folder's Qwen3ForCausalLM: the language-model head is never run, so never loaded.
        return (("text_encoder", "tokenizer", Qwen3Model, TextRole("Qwen3", DIT_TEXT_TOKENS, chat=True)),)

    def _module_classes(self):
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        return Flux2Transformer2DModel, AutoencoderKLFlux2

    def _lora_mixin(self):
        from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

        return Flux2LoraLoaderMixin

    def _text_width(self, config, role):
        # (and the check that the hidden states klein reads exist)
        layers = config.get("num_hidden_layers", 0)
        if layers < max(QWEN3_LAYERS):
            raise UserError(f"the text encoder has {layers} layers; FLUX.2 [klein] reads the hidden states of layers "
                            f"{', '.join(map(str, QWEN3_LAYERS))}", "use the Qwen3 text encoder of the model's release")
        return len(QWEN3_LAYERS) * config["hidden_size"]

    def _text_input(self, transformer_config, role):
        return transformer_config["joint_attention_dim"]

    def _steps_and_guidance(self, model):
        # The step-distilled klein: 4 steps without guidance; the base: Flux2KleinPipeline's defaults (50, 4.0).
        return (4, 1.0) if model.distilled else (50, 4.0)

    def _ignored(self, model, s) -> list[str]:
        if not model.distilled:
            return []
        ignored = [(f"guidance {s.guidance} is ignored", s.guidance > 1),
                   ("the negative prompt is ignored", bool(s.negative_prompt))]
        return [f"{self.name} (step-distilled) runs without guidance: {what}" for what, used in ignored if used]

    def cfg_scale(self, model, s) -> float | None:
        return s.guidance if s.guidance > 1 and not model.distilled else None

    def _text_positions(self, tokens):
        return torch.arange(tokens, dtype=torch.float32)  # FLUX.2: the 4th axis counts the text tokens

    def _mu(self, image_tokens, steps, config):
        return flux2_mu(image_tokens, steps)

    def _noise_shape(self, channels, h, w):
        return channels, h, w  # drawn patchified

    def _pack(self, latents, h, w):
        b, c = latents.shape[:2]
        return latents.reshape(b, c, h * w).permute(0, 2, 1)  # (B, N, C)

    def _unpack(self, latents, h, w):
        b, _, c = latents.shape
        return latents.permute(0, 2, 1).reshape(b, c, h, w)  # the VAE decoder graph unpatchifies


def _read_config(path: Path, part: str) -> dict[str, Any]:
    file = path / part / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {file} ({str(exc).splitlines()[0][:200]})",
                        f"the model folder's {part}/ is incomplete: copy it from the model's original release") \
            from None


def _fits(path: Path, a: str, a_value, b: str, b_value, what: str) -> None:
    if a_value != b_value:
        raise UserError(f"{path}: the {a} and the {b} do not fit ({what}: {a_value} vs {b_value})",
                        f"the folder mixes parts of different models: restore the {b} (or the {a}) of the "
                        "model's original release")


def _tokenizer_class(encoder_cls):
    from transformers import AutoTokenizer, CLIPTokenizer

    return CLIPTokenizer if encoder_cls.__name__.startswith("CLIP") else AutoTokenizer


FLUX1 = Flux1Family()
FLUX2_KLEIN = Flux2KleinFamily()
