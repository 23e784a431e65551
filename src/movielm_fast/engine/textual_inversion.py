"""Reading textual-inversion embeddings: diffusers format and AUTOMATIC1111 format, SD 1.x/2.x and SDXL; for the
transformer families one tensor per text encoder, named as the family names its encoders (FLUX.1: clip_l and t5,
FLUX.2 [klein]: qwen3), as SDXL files name theirs.

Only safetensors or ``torch.load(weights_only=True)``: a downloaded embedding never runs pickled code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from movielm_fast.errors import UserError


@dataclass
class Embedding:
    token: str | None  # the token stored in the file, if any
    vectors: dict[str, torch.Tensor]  # by encoder ("clip_l"/"clip_g" SDXL, "t5", "qwen3"), else "single"; (n, D)
    source: str


ENCODER_KEYS = {"clip_l", "clip_g", "t5", "qwen3"}  # what a file with one tensor per text encoder names them


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(-1, t.shape[-1])


def load_embedding(path: str | Path) -> Embedding:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embedding file not found: {path}", "fix style.embedding (relative to the plan file)")
    try:
        if path.suffix == ".safetensors":
            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read embedding {path}: {str(exc).splitlines()[0][:200]}",
                        "the file is truncated or not an embedding; re-export it as safetensors") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} does not contain an embedding dictionary", "use a diffusers or A1111 embedding")
    if "clip_l" in data and "clip_g" in data or set(data) & {"t5", "qwen3"} and set(data) <= ENCODER_KEYS:
        return Embedding(None, {k: _as_2d(v) for k, v in data.items() if k in ENCODER_KEYS}, str(path))
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        tensor = params.get("*", next(iter(params.values()))) if isinstance(params, dict) else params
        name = data.get("name") if isinstance(data.get("name"), str) else None
        return Embedding(name, {"single": _as_2d(tensor)}, str(path))
    if "emb_params" in data:  # A1111 .safetensors
        return Embedding(None, {"single": _as_2d(data["emb_params"])}, str(path))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        raise UserError(f"{path} holds {len(tensors)} tensors; a diffusers embedding holds one {{token: tensor}}",
                        "pass one embedding per style")
    (token, tensor), = tensors.items()
    return Embedding(token, {"single": _as_2d(tensor)}, str(path))


def vectors_for_model(emb: Embedding, kind: str) -> list[torch.Tensor]:
    """One (n, D) tensor per text encoder of a model of `kind`."""
    if kind not in ("sd", "sdxl"):  # the transformer families: one named tensor per encoder
        from .families import family_by_kind

        family = family_by_kind(kind)
        missing = [k for k in family.embedding_keys if k not in emb.vectors]
        if missing:
            raise UserError(f"{emb.source} has no {' or '.join(missing)} vectors; a {family.name} embedding holds one "
                            f"tensor per text encoder: {', '.join(family.embedding_keys)}",
                            "use an embedding trained for this model family (a safetensors file with those keys)")
        return [emb.vectors[k] for k in family.embedding_keys]
    if kind == "sdxl":
        if "clip_l" not in emb.vectors:
            raise UserError(f"{emb.source} is an SD 1.x/2.x embedding but the model is SDXL",
                            "use an SDXL embedding (with clip_l and clip_g entries)")
        return [emb.vectors["clip_l"], emb.vectors["clip_g"]]
    if "single" not in emb.vectors:
        raise UserError(f"{emb.source} is an SDXL embedding but the model is SD 1.x/2.x",
                        "use an embedding trained for this model")
    return [emb.vectors["single"]]
