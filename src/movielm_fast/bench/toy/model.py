"""The toy model's architecture: Stable Diffusion 1.x components, sized for 64x64 toy-world images on a CPU.

The VAE has three blocks, so it downsamples by 4 (64x64 images -> 16x16x4 latents): at 8x8 the three shape
positions would be two latent pixels apart. The engine reads the factor from the VAE's config.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_DIM = 64


def scheduler():
    return DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")


def vae():
    return AutoencoderKL(
        block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=64)


def unet():
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        # Attention at 8x8 and 4x4 only: at 16x16 it would cost twice the whole rest of the UNet on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
        cross_attention_dim=TEXT_DIM, attention_head_dim=4)


def text_encoder():
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=TEXT_DIM, intermediate_size=TEXT_DIM * 2,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu"))
