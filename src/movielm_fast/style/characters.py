"""A character's own token (consistency mode): MovieLLM's textual inversion, applied to a character instead of a
style.

    character -> anchor render (its appearance, a seed of its own) -> a token learned from that one image -> file

The token is trained on the anchor with the anchor's own prompt around it ("<style>, <token> <appearance>, <rest
of the anchor prompt>"): what the words say (the place, the background, what the appearance states) they explain
already, so the token learns what they leave open -- the anchor's colour, face or coat -- and every frame that shows
the character carries it before the appearance. A frame then depends on its prompt and seed alone: any batch, order,
worker or backend renders it the same, and frames without characters are untouched.

Entries live in a library of their own (`default_characters()`, the style library's format and helpers): one folder
per anchor key and training caption with the embedding, the anchor image and meta.json (written last, so an
interrupted write is a miss), so a re-run or another worker reads the token instead of training it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load, save

from movielm_fast.engine.jobs import AnchorSpec, FrameJob
from movielm_fast.paths import atomic_write_bytes, atomic_write_text, cache_root
from movielm_fast.style.images import TrainingImage
from movielm_fast.style.library import STYLE_FORMAT, embedding_state_dict, embedding_vectors, lookup, write_index
from movielm_fast.style.scenes import SceneRenderer
from movielm_fast.style.training import Frozen, StyleSettings, Trainer, init_vectors, train_token

log = logging.getLogger("movielm_fast")


@dataclass(frozen=True)
class CharacterToken:
    """One character's learned token and the anchor it was learned from."""

    spec: AnchorSpec
    token: str
    vectors: tuple[torch.Tensor, ...]  # one (1, D_i) per text encoder
    image: np.ndarray  # the anchor, (H, W, 3) uint8
    source: str  # the library entry
    cache_hit: bool


def default_characters() -> Path:
    return cache_root() / "characters"


def token_name(spec: AnchorSpec) -> str:
    """`<rosa-1a2b3c4d>`: readable in prompts, and one per anchor (a changed anchor is a new token)."""
    name = re.sub(r"[^a-z0-9]+", "-", spec.character.lower()).strip("-")[:32] or "character"
    return f"<{name}-{spec.key[:8]}>"


def character_token(renderer: SceneRenderer, spec: AnchorSpec, root: Path | None = None) -> CharacterToken:
    """The character's token: from the library, or learned now (anchor render, then textual inversion)."""
    root = (root or default_characters()).resolve()
    # The caption is what the token is trained with: another caption is another token.
    entry = root / hashlib.sha256(f"{spec.key}:{spec.caption}".encode()).hexdigest()[:16]
    token = token_name(spec)
    meta = lookup(entry)
    if meta:
        state = load((entry / meta["file"]).read_bytes())
        vectors = embedding_vectors(renderer.model.kind, token, state)
        with Image.open(entry / "anchor.png") as im:
            image = np.asarray(im.convert("RGB"))
        return CharacterToken(spec, token, vectors, image, str(entry), True)

    t0 = time.perf_counter()
    job = FrameJob(spec.movie_id, f"anchor:{spec.character}", spec.prompt, spec.negative_prompt, spec.seed)
    image = np.asarray(renderer.render([job], spec.settings)[0])
    model, cons = renderer.model, spec.consistency
    s = StyleSettings(steps=cons.token_steps, lr=cons.token_lr, batch_size=4,
                      min_noise=cons.token_min_noise).resolve(model)
    # Starts from the appearance's own words (their mean): the token begins as "more of the same" and moves only
    # as far as the anchor needs.
    init_word, init = init_vectors(model, spec.character, spec.appearance, s.num_vectors)
    with torch.inference_mode(False), Frozen(model):
        trainer = Trainer(model, renderer.device, s, init, token)
        trainer.encode_images([TrainingImage(image, None, image.shape[:2], (0, 0))], chunk=1)
        report = train_token(trainer, [[trainer.caption_ids(spec.caption)]])
    vectors = tuple(v.detach().float().cpu() for v in trainer.vectors)

    # The embedding and the anchor first, meta.json last: meta is the entry's commit mark.
    atomic_write_bytes(entry / "embedding.safetensors", save(embedding_state_dict(model.kind, token, list(vectors))))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(entry / "anchor.png", buf.getvalue())
    report["seconds_total"] = round(time.perf_counter() - t0, 3)
    meta = {"format": STYLE_FORMAT, "key": spec.key, "name": spec.character, "description": spec.prompt,
            "token": token, "file": "embedding.safetensors", "init_word": init_word,
            "model": {"id": model.model_id, "hash": model.content_hash, "kind": model.kind},
            "source": f"anchor of {spec.character!r} in movie {spec.movie_id!r}, seed {spec.seed}",
            "caption": spec.caption, "settings": s.key_dict(), "report": report,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(entry / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    write_index(root)
    log.info("character %r: token %s learned in %.1f s (eval loss %.4f -> %.4f)", spec.character, token,
             report["seconds_total"], report["eval_loss_before"], report["eval_loss_after"])
    return CharacterToken(spec, token, vectors, image, str(entry), False)
