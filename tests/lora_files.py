"""LoRA files made in tests, with random factors, in kohya/A1111 and diffusers/PEFT naming."""

from __future__ import annotations

from pathlib import Path

from movielm_fast.testing import make_random_lora


def make_lora(path: Path, pipe, fmt: str = "kohya", **kw) -> Path:
    """A random LoRA for a diffusers pipeline's UNet and text encoder(s) (engine.demo.make_random_lora)."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return make_random_lora(path, pipe.unet, encoders, fmt, **kw)
