"""Real Stable Diffusion architectures with random weights, so timings are realistic without downloading weights.

`sd15-arch` and `sdxl-arch` are built from the published configs of SD 1.5 and SDXL base (same layer shapes, so the
same FLOPs, memory traffic and kernel mix), initialised randomly from a fixed seed and saved once as ordinary
diffusers folders under the movielm cache. The engine then loads them like any local model. Their images are noise:
use them for timing only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from movielm_fast.engine.demo import clip_tokenizer
from movielm_fast.paths import atomic_dir, cache_root
from movielm_fast.testing import build_tiny_pipeline

ARCH_VERSION = "v1"  # bump when a config below changes, so a stale cached folder is never timed by mistake
ARCH_MODELS = ("sd15-arch", "sdxl-arch", "tiny-sd")

# Both families were trained with the same noise schedule; the sampler itself comes from the bench settings.
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")

VAE_CONFIG = dict(  # shared by SD 1.5 and SDXL (SDXL differs only in scaling factor and fp16 overflow)
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def clip_text_config(hidden: int, layers: int, heads: int, act: str, projection: int | None = None):
    """CLIP ViT-L/14 (768) and OpenCLIP ViT-bigG/14 (1280) text towers, as SD 1.5 / SDXL ship them."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=projection or hidden)


def build_arch_pipeline(name: str, seed: int = 0):
    """The named architecture as an in-memory diffusers pipeline with random weights (fp32). "tiny-sd": the tests'
    tiny SD 1.x model (1/8 latents like every real SD VAE, unlike the toy demo model's 1/4), for host-side
    measurements where only the latent and image sizes matter."""
    if name == "tiny-sd":
        return build_tiny_pipeline("sd", seed=seed)
    torch.manual_seed(seed)
    if name == "sd15-arch":
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE_CONFIG, sample_size=512, scaling_factor=0.18215),
            text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu")), tokenizer=clip_tokenizer(),
            unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=PNDMScheduler(**_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if name == "sdxl-arch":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
            text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, "gelu", projection=1280)),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=UNet2DConditionModel(**SDXL_UNET), scheduler=EulerDiscreteScheduler(**_SCHEDULER),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCH_MODELS)}")


def arch_model_path(name: str) -> Path:
    """The cached diffusers folder of `name`, built on first use (minutes, and 4.3 / 13.9 GB of fp32 weights).

    Written to a temporary folder and renamed into place, so an interrupted build never leaves half a model."""
    target = cache_root() / "arch" / f"{name}-{ARCH_VERSION}"
    with atomic_dir(target, "model_index.json") as tmp:
        if tmp is not None:
            build_arch_pipeline(name).save_pretrained(tmp, safe_serialization=True)
    return target


def resolve_model(spec: str) -> str:
    """A --model value -> what `engine.models.load_model` accepts ("demo" and paths pass through)."""
    return str(arch_model_path(spec)) if spec in ARCH_MODELS else spec
