"""The toy models' architectures, sized for 64x64 toy-world images on a CPU.

`demo`: Stable Diffusion 1.x components. The VAE has three blocks, so it downsamples by 4 (64x64 images ->
16x16x4 latents): at 8x8 the three shape positions would be two latent pixels apart. The engine reads the factor
from the VAE's config.

`demo-dit`: a FLUX.1 [schnell]-layout pipeline (FluxTransformer2DModel: double blocks of joint attention, then single
blocks; flow matching; no guidance embedding, so it renders with true classifier-free guidance) on the same VAE,
whose 16x16x4 latents become 8x8 = 64 tokens of 2x2 patches. Its text encoders are the demo's CLIP (pooled) and a
small T5 whose tokenizer knows whole toy-world words, at DIT_TEXT_TOKENS tokens instead of FLUX's 512 (the engine
reads the length from the tokenizer's model_max_length).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from . import world as W

TEXT_DIM = 64
DIT_TEXT_TOKENS = 40  # the longest toy prompt, "plain style, " and the held-out phrasings included, is 37 tokens


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


# --- demo-dit ---------------------------------------------------------------------------------------------------


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def dit():
    from diffusers import FluxTransformer2DModel

    # 4 heads of 32 (rotary axes 8 + 12 + 12 over (unused, row, column)); joint attention in the double blocks is
    # where a caption's words meet the image's tokens.
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


# Words a toy prompt may contain beyond the world's own: those of the engine's prompts and of everyday captions
# (the phrasing check's among them). A word outside the list is spelled letter by letter.
_EVERYDAY = ("the of in on at by to with and or no not just only one two three shapes shape there is are it its side "
             "background coloured colored front nothing empty scene picture image photo drawing painting showing "
             "some this that under over near next beside above below behind between style styled look")


def toy_words() -> list[str]:
    phrases = [*W.COLOURS, *W.SHAPES, *W.BACKGROUNDS, *W.BACKGROUND_PHRASES.values(), *W.STYLES, "big small a an",
               *(w for table in (W.SIZE_WORDS, W.POS_WORDS, W.BACKGROUND_WORDS) for synonyms in table.values()
                 for w in synonyms), _EVERYDAY]
    return sorted({w for phrase in phrases for w in phrase.split()})


def t5_tokenizer():
    """A T5 (unigram) tokenizer of whole toy words, then single characters, DIT_TEXT_TOKENS long. (Case is kept:
    a normalizer set here does not survive save_pretrained and loading as T5Tokenizer.)"""
    from transformers.models.t5.tokenization_t5 import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.:;!?'()-_<>[]/&+"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in toy_words()] + [(c, -4.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = DIT_TEXT_TOKENS
    return tok


def t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_ff=TEXT_DIM * 2, d_kv=16, num_heads=4, num_layers=2,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, dropout_rate=0.0, feed_forward_proj="gated-gelu"))
