"""LoRA files made in tests, with random factors, in kohya/A1111 and diffusers/PEFT naming."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# Layer kinds a LoRA trainer targets: attention and feed-forward linears, transformer projections, and (conv LoRA /
# LoCon) resnet 3x3 and 1x1 convolutions and the time-embedding projection.
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "resnets.0.conv1",
               "conv_shortcut", "time_emb_proj")
TE_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module: torch.nn.Module, suffixes) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and n.endswith(suffixes)]


def _factors(m: torch.nn.Module, rank: int, g: torch.Generator, std: float):
    w = m.weight
    if w.ndim == 4:  # conv: down is a kxk conv to `rank` channels, up a 1x1 conv back
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * std
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
    else:
        down = torch.randn(rank, w.shape[1], generator=g) * std
        up = torch.randn(w.shape[0], rank, generator=g) * std
    return down, up


def make_lora(path: Path, pipe, fmt: str = "kohya", unet: bool = True, te: bool = True, rank: int = 4,
              alpha: float | None = 2.0, seed: int = 0, std: float = 0.3) -> Path:
    """A LoRA for `pipe`'s UNet and/or text encoder(s). kohya: `lora_unet_<name with _>.lora_down.weight`, `.alpha`;
    diffusers: `unet.<name>.lora_A.weight` (PEFT names; no alpha, so alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    parts = []
    if unet:
        parts.append(("unet", "lora_unet_", pipe.unet, UNET_LAYERS))
    if te:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        for i, enc in enumerate(encoders):
            kohya = "lora_te_" if len(encoders) == 1 else f"lora_te{i + 1}_"
            parts.append(("text_encoder" if i == 0 else "text_encoder_2", kohya, enc, TE_LAYERS))
    for comp, kohya, module, layers in parts:
        for name, m in _targets(module, layers):
            down, up = _factors(m, rank, g, std)
            if fmt == "kohya":
                # kohya names the CLIP layers text_model.encoder...; transformers may have flattened text_model away
                full = name if comp == "unet" or name.startswith("text_model.") else "text_model." + name
                base = kohya + full.replace(".", "_")
                sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
                if alpha is not None:
                    sd[f"{base}.alpha"] = torch.tensor(float(alpha))
            else:
                sd[f"{comp}.{name}.lora_A.weight"], sd[f"{comp}.{name}.lora_B.weight"] = down, up
    save_file(sd, str(path))
    return path
