"""Style immobilization (MovieLLM): learn one textual-inversion token per style, fast, and keep it in a library.

    style -> scenes (rendered by our engine, or the user's images) -> VAE latents ONCE -> train the token -> file

The scenes come from `scenes`, the user's images from `images`, the training from `training`, the file and the
library entry from `library`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save

from movielm_fast.engine.textual_inversion import load_embedding, vectors_for_model
from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_bytes, atomic_write_text
from movielm_fast.style.images import IMAGE_TEMPLATES, load_images
from movielm_fast.style.library import (
    STYLE_FORMAT,
    StyleResult,
    default_library,
    embedding_state_dict,
    lookup,
    slug,
    write_index,
)
from movielm_fast.style.scenes import SceneRenderer, render_scenes
from movielm_fast.style.training import Frozen, StyleSettings, Trainer, check_token, init_vectors, train_token

log = logging.getLogger("movielm_fast")


def immobilize_style(renderer: SceneRenderer, style, settings: StyleSettings | None = None, *,
                     images: str | Path | None = None, out: str | Path | None = None, token: str | None = None,
                     on_step: Callable[[int, float], None] | None = None) -> StyleResult:
    """Learn (or find in the library) the token of `style` (an movielm_fast.plan.Style) for renderer's model."""
    t_start = time.perf_counter()
    model = renderer.model
    s = (settings or StyleSettings()).resolve(model)
    token = token or style.token or f"<{slug(style.name)}>"
    check_token(model, token)
    root = (Path(out) if out else default_library()).resolve()  # the path is the token's source: keep it stable

    notes: list[str] = []
    fitted, digest = None, None
    if images is not None:
        fitted, notes, digest = load_images(images, s.resolution)  # errors before any work; digest joins the key
    key_src = {"format": STYLE_FORMAT, "model_hash": model.content_hash, "kind": model.kind, "name": style.name,
               "description": style.description, "settings": s.key_dict(), "images": digest}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    entry = root / f"{slug(style.name)}-{key}"
    meta = lookup(entry)
    if meta:
        path = entry / meta["file"]
        log.info("style %r: library hit %s", style.name, path)
        vectors = vectors_for_model(load_embedding(path), model.kind)
        return StyleResult(path, token, True, key, vectors, meta)

    device = renderer.device
    t0 = time.perf_counter()
    if fitted is None:
        fitted = render_scenes(renderer, style.name, style.description, s)
        source = f"generated: {s.scenes} scene(s)"
    else:
        source = f"images: {Path(images).resolve()} ({len(fitted)})"
    scenes_s = time.perf_counter() - t0

    init_word, init = init_vectors(model, style.name, s.init_word, s.num_vectors)
    with torch.inference_mode(False), Frozen(model):
        trainer = Trainer(model, device, s, init, token)
        t1 = time.perf_counter()
        trainer.encode_images(fitted, chunk=min(s.batch_size, 4))
        encode_s = time.perf_counter() - t1
        captions = []
        for im in fitted:
            templates = [f"{{}}, {im.caption_subject}"] if im.caption_subject else IMAGE_TEMPLATES
            captions.append([trainer.caption_ids(t) for t in templates])
        report = train_token(trainer, captions, on_step)
    vectors = [v.detach().float().cpu() for v in trainer.vectors]
    if not all(torch.isfinite(v).all() for v in vectors):
        raise UserError("style training diverged (the learned vector is NaN/inf)",
                        "use a lower --lr, or --dtype fp32")

    # The embedding first, meta.json last: meta is the entry's commit mark, so an interrupted write is a miss.
    path = entry / "embedding.safetensors"
    atomic_write_bytes(path, save(embedding_state_dict(model.kind, token, vectors)))
    report.update({"seconds_scenes": round(scenes_s, 3), "seconds_encode": round(encode_s, 3),
                   "seconds_total": round(time.perf_counter() - t_start, 3), "images": len(fitted),
                   "device": str(device), "notes": notes})
    meta = {"format": STYLE_FORMAT, "key": key, "name": style.name, "description": style.description,
            "token": token, "file": path.name, "init_word": init_word,
            "model": {"id": model.model_id, "hash": model.content_hash, "kind": model.kind}, "source": source,
            "settings": s.key_dict(), "report": report, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load": ("diffusers: pipe.load_textual_inversion(file)" if model.kind == "sd" else
                     "diffusers: sd = safetensors.torch.load_file(file); pipe.load_textual_inversion(sd['clip_l'], "
                     "token=T, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer); the same with "
                     f"sd['{'clip_g' if model.kind == 'sdxl' else 't5'}'], pipe.text_encoder_2, pipe.tokenizer_2")}
    atomic_write_text(entry / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    write_index(root)
    log.info("style %r: trained %s in %.1f s (%.3f s/step), eval loss %.4f -> %.4f", style.name, path,
             report["seconds_total"], report["seconds_per_step"], report["eval_loss_before"],
             report["eval_loss_after"])
    return StyleResult(path, token, False, key, vectors, meta)
