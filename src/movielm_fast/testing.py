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


# --- the transformer families: tiny FLUX.1 and FLUX.2 [klein] pipelines ---------------------------------------------
# Tokenizers are built offline from a small vocabulary, deterministically (no trained merges whose ties could fall
# differently from run to run): T5 a unigram model of whole words and single characters, Qwen a byte-level BPE of
# single bytes with Qwen3's chat-template markers.

TINY_WORDS = ("a lighthouse on cliff at dusk oil painting woman in lavender stands the ballroom blurry low quality "
              "duchess and commoner walk through gothic garden night red circle blue square scene rosa soft sepia")
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
"""What Qwen3's own template writes for one user message with add_generation_prompt and thinking off."""


def tiny_t5_tokenizer():
    from transformers.models.t5.tokenization_t5 import T5Tokenizer

    chars = sorted(set(TINY_WORDS.replace(" ", "")) | set("0123456789,.:;!?'()-_<>[]"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(TINY_WORDS.split()))] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_qwen_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>"], special_tokens=True)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def _tiny_vae(cls=None, **extra):
    from diffusers import AutoencoderKL

    return (cls or AutoencoderKL)(
        block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=256, **extra)


def build_tiny_flux(guidance_embeds: bool = True, seed: int = 0):
    """A tiny FLUX.1 FluxPipeline with random weights: [dev]-like (guidance embedding, dynamic shift) or, with
    guidance_embeds=False, [schnell]-like (no guidance input, a fixed shift of 1). The VAE has FLUX's 1/8 layout with
    its shift and scale; the transformer one double and one single block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5_tok = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    vae = _tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True) if guidance_embeds else \
        FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_text_config(32)),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def build_tiny_flux2_klein(distilled: bool = False, seed: int = 0):
    """A tiny FLUX.2 [klein] Flux2KleinPipeline with random weights: a Qwen3 of 28 narrow layers (klein reads the
    hidden states of layers 9, 18 and 27), FLUX.2's VAE with random batch-norm statistics (so that undoing them
    shows), and `distilled` as the step-distilled klein says it in model_index.json."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer()
    qwen = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=True))
    vae = _tiny_vae(AutoencoderKLFlux2)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                              vae=vae, text_encoder=qwen, tokenizer=tok, transformer=transformer,
                              is_distilled=distilled)


# kohya's names of FLUX.1 layers (BFL's own module names) -> the diffusers modules each one changes; a fused qkv is
# one LoRA over the concatenated projections. (linear1 of the single blocks is left out: diffusers' converter splits
# it at the full-size model's widths.)
KOHYA_FLUX_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
                     "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
                     "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                     "txt_attn_proj": ("attn.to_add_out",), "txt_mlp_0": ("ff_context.net.0.proj",),
                     "txt_mlp_2": ("ff_context.net.2",)}
KOHYA_FLUX_SINGLE = {"linear2": ("proj_out",)}


def make_random_dit_lora(path: Path, transformer, text_encoder=None, fmt: str = "diffusers", rank: int = 4,
                         alpha: float | None = 2.0, seed: int = 0, std: float = 0.3) -> Path:
    """A LoRA with random factors for a transformer family's transformer (every linear layer of its blocks) and,
    if given, its CLIP text encoder. diffusers: `transformer.<name>.lora_A.weight` (PEFT names, alpha = rank);
    kohya (FLUX.1 only): BFL's block names (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if fmt == "diffusers":
        blocks = [(n, m) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                  and "transformer_blocks." in n]
        for name, m in blocks:
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = \
                _lora_factors(m, rank, g, std)
        for name, m in _lora_targets(text_encoder, LORA_TE_LAYERS) if text_encoder is not None else []:
            sd[f"text_encoder.{name}.lora_A.weight"], sd[f"text_encoder.{name}.lora_B.weight"] = \
                _lora_factors(m, rank, g, std)
    else:
        groups = [(f"double_blocks_{i}_{k}", [f"transformer_blocks.{i}.{m}" for m in mods])
                  for i in range(len(transformer.transformer_blocks)) for k, mods in KOHYA_FLUX_DOUBLE.items()]
        groups += [(f"single_blocks_{i}_{k}", [f"single_transformer_blocks.{i}.{m}" for m in mods])
                   for i in range(len(transformer.single_transformer_blocks)) for k, mods in KOHYA_FLUX_SINGLE.items()]
        targets = [(f"lora_unet_{name}", [transformer.get_submodule(m) for m in mods]) for name, mods in groups]
        if text_encoder is not None:
            targets += [("lora_te1_" + ("text_model." + n).replace(".", "_"), [m])
                        for n, m in _lora_targets(text_encoder, LORA_TE_LAYERS)]
        for base, mods in targets:
            sd[f"{base}.lora_down.weight"] = torch.randn(rank, mods[0].in_features, generator=g) * std
            sd[f"{base}.lora_up.weight"] = torch.randn(sum(m.out_features for m in mods), rank, generator=g) * std
            if alpha is not None:
                sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return path
