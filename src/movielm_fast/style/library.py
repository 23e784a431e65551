"""The style library on disk: its folder, entry naming, the index, and the file formats.

The learned file is diffusers' format: ``{token: (n, D)}`` for SD 1.x/2.x, ``{"clip_l": (n, 768), "clip_g":
(n, 1280)}`` for SDXL, as safetensors. The library folder holds one sub-folder per (model content hash, style name +
description, training settings [+ user images]) with the embedding and a readable ``meta.json``; ``index.json`` at the
top lists them all and is rebuilt from the meta files on every write (so concurrent trainers never lose an entry).
An entry is complete once its meta.json is written: it is written last, so an interrupted write is a miss.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_text, cache_root

log = logging.getLogger("movielm_fast")

STYLE_FORMAT = "movielm-fast/style@1"
INDEX_FORMAT = "movielm-fast/style-index@1"


@dataclass
class StyleResult:
    path: Path
    token: str
    cache_hit: bool
    key: str
    vectors: list[torch.Tensor]  # one (n, D_i) per text encoder: bind them with PromptEncoder.add_token
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> dict[str, Any]:
        return self.meta.get("report", {})


def default_library() -> Path:
    return cache_root() / "styles"


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not s:
        raise UserError(f"style name {name!r} has no letters or digits", "give the style a name such as Gothic")
    return s[:48]


def list_styles(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every complete entry of the library (an entry is complete once its meta.json is written). An entry whose
    meta.json is damaged or of another shape is left out (and named in a warning): one bad entry never hides the
    others, nor fails the training that rebuilds the index."""
    root = Path(root) if root else default_library()
    entries = []
    for meta_path in sorted(root.glob("*/meta.json")):
        meta = lookup(meta_path.parent)
        if meta is None:
            continue
        try:
            rep = meta.get("report") or {}
            entries.append({"key": meta["key"], "name": meta["name"], "description": meta["description"],
                            "token": meta["token"], "model_id": meta["model"]["id"],
                            "model_hash": meta["model"]["hash"], "kind": meta["model"]["kind"],
                            "source": meta["source"], "steps": meta["settings"]["steps"],
                            "seconds": rep.get("seconds_total"), "created": meta.get("created"),
                            "path": str(meta_path.parent / meta["file"])})
        except (AttributeError, KeyError, TypeError):
            log.warning("style library: %s is not a style entry's meta.json: left out", meta_path)
    return entries


def write_index(root: Path) -> None:
    index = {"format": INDEX_FORMAT, "styles": list_styles(root)}
    atomic_write_text(root / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")


def lookup(entry_dir: Path) -> dict[str, Any] | None:
    """The entry's meta, or None when the entry is missing, damaged or incomplete (a cache miss): its meta.json must
    be an object of this format naming an embedding file in the entry's own folder."""
    try:
        meta = json.loads((entry_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != STYLE_FORMAT:
        return None
    file = meta.get("file")
    if not (isinstance(file, str) and file == Path(file).name and (entry_dir / file).is_file()):
        return None
    return meta


def embedding_keys(kind: str, token: str) -> tuple[str, ...]:
    """diffusers' layout of a textual-inversion file: {token: (n, D)} for SD 1.x/2.x; {"clip_l": (n, 768),
    "clip_g": (n, 1280)} for SDXL; one named tensor per text encoder for a transformer family ({"clip_l", "t5"}:
    engine.families' embedding_keys)."""
    if kind == "sdxl":
        return ("clip_l", "clip_g")
    if kind != "sd":
        from movielm_fast.engine.families import family_by_kind

        return tuple(family_by_kind(kind).embedding_keys)
    return (token,)


def embedding_state_dict(kind: str, token: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One (n, D) tensor per text encoder -> the file's tensors (embedding_keys)."""
    return dict(zip(embedding_keys(kind, token), (v.detach().float().cpu().contiguous() for v in vectors)))


def embedding_vectors(kind: str, token: str, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """embedding_state_dict's inverse: one (n, D) tensor per text encoder of a model of `kind`."""
    return tuple(state[k] for k in embedding_keys(kind, token))
