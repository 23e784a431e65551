"""Real architectures with random weights, so timings are realistic without downloading weights.

`sd15-arch` and `sdxl-arch` are built from the published configs of SD 1.5 and SDXL base (same layer shapes, so the
same FLOPs, memory traffic and kernel mix), initialised randomly from a fixed seed and saved once as ordinary
diffusers folders under the movielm cache. The engine then loads them like any local model.

`flux-arch` (FLUX.1 [dev]: its 11.9B transformer, T5-XXL and CLIP-L, the 16-channel VAE) and `klein-arch` (FLUX.2
[klein] 4B, step-distilled: its 3.9B transformer, Qwen3-4B, the FLUX.2 VAE) are built in memory, straight on the
device and in the run's dtype (`dit_arch_bundle`): saved, they would be 34 and 16 GB of bf16 weights, more disk
than a lent GPU machine has beside the UNet ones, and a minute of writing and reading each. `tiny-flux` and
`tiny-klein` are the tests' tiny models built the same way, for the CPU. The DiTs' tokenizers are the tests' small
offline ones (no download): the text encoders still see their full 512 tokens, so the work is the real one.

Their images are noise: use them for timing only.
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
from movielm_fast.engine.families import loader_for
from movielm_fast.engine.models import ModelBundle, load_model
from movielm_fast.paths import atomic_dir, cache_root
from movielm_fast.testing import build_tiny_pipeline

ARCH_VERSION = "v1"  # bump when a config below changes, so a stale cached folder is never timed by mistake
ARCH_MODELS = ("sd15-arch", "sdxl-arch", "tiny-sd")
DIT_ARCH_MODELS = ("flux-arch", "klein-arch", "tiny-flux", "tiny-klein")

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


# FLUX.1 [dev] and FLUX.2 [klein] 4B as their releases' config files give them (diffusers' and transformers' names).
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX1_VAE = dict(
    VAE_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
    shift_factor=0.1159, sample_size=1024)
FLUX1_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                       use_dynamic_shifting=True)
T5_XXL = dict(  # google/t5-v1_1-xxl, the encoder FLUX.1 conditions on
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    tie_word_embeddings=False)
KLEIN_4B_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False)
QWEN3_4B = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000,
    tie_word_embeddings=True)


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


def build_dit_arch(name: str, seed: int = 0):
    """The named DiT as an in-memory diffusers pipeline with random weights, built on the current default device
    and dtype (`dit_arch_bundle` sets them). "tiny-flux": the tests' tiny FLUX.1 [dev]; "tiny-klein": their tiny
    step-distilled klein."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    from movielm_fast.testing import build_tiny_flux, build_tiny_flux2_klein, tiny_qwen_tokenizer, tiny_t5_tokenizer

    if name == "tiny-flux":
        return build_tiny_flux(guidance_embeds=True, seed=seed)
    if name == "tiny-klein":
        return build_tiny_flux2_klein(distilled=True, seed=seed)
    torch.manual_seed(seed)
    if name == "flux-arch":
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER), vae=AutoencoderKL(**FLUX1_VAE),
            text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu")), tokenizer=clip_tokenizer(),
            text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_2=tiny_t5_tokenizer(),
            transformer=FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER))
    if name == "klein-arch":
        return Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=AutoencoderKLFlux2(),
            text_encoder=Qwen3Model(Qwen3Config(**QWEN3_4B)), tokenizer=tiny_qwen_tokenizer(),
            transformer=Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER), is_distilled=True)
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(DIT_ARCH_MODELS)}")


def dit_arch_bundle(name: str, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """`build_dit_arch(name)` as the engine's ModelBundle: every module made on `device` in `dtype` from the start
    (random initialisation on a GPU takes seconds), the parts named as its family loads them from a folder."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the run's dtype: no full-precision copy first
    try:
        with torch.device(device):
            pipe = build_dit_arch(name)
    finally:
        torch.set_default_dtype(previous)
    parts = pipe.components
    family = loader_for(type(pipe).__name__)
    scheduler = {"_class_name": type(pipe.scheduler).__name__, **pipe.scheduler.config}
    return ModelBundle(
        kind=family.kinds[0], model_id=name, path=cache_root() / "arch" / f"{name}-{ARCH_VERSION}",
        content_hash=f"{name}-{ARCH_VERSION}", unet=None, vae=parts["vae"],
        text_encoders=[parts[folder] for folder, _, _, _ in family.encoders],
        tokenizers=[parts[folder] for _, folder, _, _ in family.encoders], scheduler_config=scheduler,
        transformer=parts["transformer"], distilled=bool(getattr(pipe.config, "is_distilled", False)))


def load_bench_model(name: str, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """A --model value as a loaded bundle: a DiT architecture built in memory on `device`, or what
    `engine.models.load_model` loads (the UNet architectures from their cached folders)."""
    if name in DIT_ARCH_MODELS:
        return dit_arch_bundle(name, device, dtype)
    return load_model(resolve_model(name))


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
