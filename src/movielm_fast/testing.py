"""Factories for tests and benchmarks: tiny Stable Diffusion models and LoRAs with RANDOM weights.

Their images mean nothing, which is what the parity tests want: any mismatch with diffusers shows, and nothing
depends on what is drawn. The demo model (engine.demo), trained on the toy world, is the one whose images mean
something.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from movielm_fast.engine.demo import clip_tokenizer


def _text_config(hidden: int, projection: int | None = None):
    kwargs = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=hidden, intermediate_size=hidden * 2,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", **kwargs)


def build_tiny_pipeline(kind: str = "sd", seed: int = 0, prediction_type: str = "epsilon"):
    """Create a tiny SD 1.x-style ("sd") or SDXL-style ("sdxl") diffusers pipeline with random weights."""
    # The pipeline classes import transformers' image processors (seconds, and warnings without torchvision); the
    # demo is built once, so every later run is spared that import.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading")
    # Four blocks, so latents are 1/8 of the image as in real SD VAEs (the engine and diffusers assume it).
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=256)
    unet_base = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16)
    if kind == "sd":
        unet = UNet2DConditionModel(**unet_base, cross_attention_dim=32, attention_head_dim=8)
        text_encoder = CLIPTextModel(_text_config(32))
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":
        unet = UNet2DConditionModel(
            **unet_base, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64)
        text_encoder = CLIPTextModel(_text_config(32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, projection=32))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True)
    if kind == "sdxl_refiner":
        # SDXL refiner layout: only text_encoder_2, a UNet conditioned on 5 time ids (original size, crop, aesthetic
        # score) + the pooled text, cross-attending to text_encoder_2 alone. Same seed, so the same VAE as "sdxl".
        unet = UNet2DConditionModel(
            **unet_base, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=72,
            cross_attention_dim=32)
        torch.manual_seed(seed + 1000)  # its own text encoder weights, unlike the base's second encoder
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, projection=32))
        from diffusers import StableDiffusionXLImg2ImgPipeline

        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
            tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def build_tiny_autoencoder_tiny(seed: int = 0, latent_channels: int = 4, channels: int = 16):
    """A tiny AutoencoderTiny (TAESD layout: 3 upsamplings, 1/8 latents, scaling_factor 1.0), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(channels,) * 4, decoder_block_out_channels=(channels,) * 4,
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                          latent_channels=latent_channels)
    # Freshly initialised, its [0, 1] output sits near 0 with little spread, so every image would clamp to black
    # and parity tests could not tell decoders apart; re-centre and widen the RGB layer.
    with torch.no_grad():
        vae.decoder.layers[-1].bias.fill_(0.5)
        vae.decoder.layers[-1].weight.mul_(8)
    return vae


# Layer kinds a LoRA trainer targets: attention and feed-forward linears, transformer projections, and (conv LoRA /
# LoCon) resnet 3x3 and 1x1 convolutions and the time-embedding projection.
LORA_UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                    "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                    "resnets.0.conv1", "conv_shortcut", "time_emb_proj")


LORA_TE_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _lora_targets(module: torch.nn.Module, suffixes) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and n.endswith(suffixes)]


def _lora_factors(m: torch.nn.Module, rank: int, g: torch.Generator, std: float):
    w = m.weight
    if w.ndim == 4:  # conv: down is a kxk conv to `rank` channels, up a 1x1 conv back
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * std
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
    else:
        down = torch.randn(rank, w.shape[1], generator=g) * std
        up = torch.randn(w.shape[0], rank, generator=g) * std
    return down, up


def make_random_lora(path: Path, unet_model, text_encoders, fmt: str = "kohya", unet: bool = True, te: bool = True,
                     rank: int = 4, alpha: float | None = 2.0, seed: int = 0, std: float = 0.3) -> Path:
    """A LoRA with random factors for this UNet and/or text encoders (tests and benchmarks; images not meaningful).
    kohya: `lora_unet_<name with _>.lora_down.weight` and `.alpha`; diffusers: `unet.<name>.lora_A.weight` (PEFT
    names, no alpha: alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    parts = []
    if unet:
        parts.append(("unet", "lora_unet_", unet_model, LORA_UNET_LAYERS))
    if te:
        encoders = list(text_encoders)
        for i, enc in enumerate(encoders):
            kohya = "lora_te_" if len(encoders) == 1 else f"lora_te{i + 1}_"
            parts.append(("text_encoder" if i == 0 else "text_encoder_2", kohya, enc, LORA_TE_LAYERS))
    for comp, kohya, module, layers in parts:
        for name, m in _lora_targets(module, layers):
            down, up = _lora_factors(m, rank, g, std)
            if fmt == "kohya":
                # kohya names the CLIP layers text_model.encoder...; transformers may have flattened text_model away
                full = name if comp == "unet" or name.startswith("text_model.") else "text_model." + name
                base = kohya + full.replace(".", "_")
                sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
                if alpha is not None:
                    sd[f"{base}.alpha"] = torch.tensor(float(alpha))
            else:
                sd[f"{comp}.{name}.lora_A.weight"], sd[f"{comp}.{name}.lora_B.weight"] = down, up
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path
