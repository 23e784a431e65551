"""`movielm-fast eval`: CLIP scores of rendered movies (MovieLLM's consistency measure and more).

Per movie, from its manifest and files:
- clip_t: frame vs its own prompt (text-image agreement);
- clip_i_shared: between frames that name a common character (MovieLLM's frame-consistency measure);
- clip_i_anchor: each frame vs the anchor image of each character it names (consistency mode's anchors; for a
  render without the mode, the anchors of the same movie in another evaluated folder are used when present).

Scores are cosine similarities of CLIP embeddings, averaged. The CLIP model comes from a local folder in
transformers' format; nothing is downloaded. Random-weight CLIP folders (the tests') give numbers that mean
nothing: real numbers need real weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_text
from movielm_fast.plan import parse_plan
from movielm_fast.run.manifest import DamagedManifest, read_manifest
from movielm_fast.run.prompts import frame_characters

log = logging.getLogger("movielm_fast")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_FORMAT = "movielm-fast/eval@1"


class Clip:
    """A local CLIP model: image and text embeddings, L2-normalised."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"no CLIP model folder at {path} (config.json missing)",
                            "pass --clip PATH to a local CLIP model in transformers' format (save_pretrained)")
        try:
            _check_config_fits(path)
            # safetensors only: a pickled pytorch_model.bin can run code when loaded.
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, pickle.UnpicklingError) as exc:
            raise UserError(f"cannot load the CLIP model in {path}: {str(exc).splitlines()[0][:200]}",
                            "the folder needs a CLIPModel's weights as model.safetensors (pickled .bin files are "
                            "refused; convert them with save_pretrained(..., safe_serialization=True)) and its "
                            "tokenizer files") from None
        self.device = device
        pre = {}
        if (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = torch.tensor(pre.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", CLIP_STD)).view(1, 3, 1, 1)

    def _pixels(self, files: list[Path]) -> torch.Tensor:
        out = []
        for f in files:
            with Image.open(f) as im:
                im = im.convert("RGB")
                scale = self.size / min(im.size)  # shorter side to the model's size, then centre crop
                im = im.resize((max(self.size, round(im.width * scale)), max(self.size, round(im.height * scale))),
                               Image.Resampling.BICUBIC)
                left, top = (im.width - self.size) // 2, (im.height - self.size) // 2
                out.append(np.asarray(im.crop((left, top, left + self.size, top + self.size))))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def images(self, files: list[Path]) -> torch.Tensor:
        emb = self.model.get_image_features(pixel_values=self._pixels(files).to(self.device))
        return torch.nn.functional.normalize(_features(emb).float(), dim=-1).cpu()

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in ids.items()})
        return torch.nn.functional.normalize(_features(emb).float(), dim=-1).cpu()


def _check_config_fits(path: Path) -> None:
    """A UserError, before anything is allocated, when config.json describes more parameters than the folder's
    weights hold: transformers allocates what the config says (an absurd config: hundreds of GB) before it reads
    the weights. The model is built on the meta device (no memory), after its layer counts are checked against
    the weights' own (so an absurd count is not built either)."""
    from safetensors import safe_open
    from transformers import CLIPConfig

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return  # no safetensors weights: loading refuses the folder, and says why
    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as weights:
                shapes.update((k, tuple(weights.get_slice(k).get_shape())) for k in weights.keys())
        except Exception as exc:  # safetensors' own error type for a damaged header
            raise UserError(f"{f} is not a readable .safetensors file ({str(exc).splitlines()[0][:160]})",
                            "copy the model folder again") from None
    hint = "use the config.json saved with these weights (save_pretrained writes both)"
    for part in ("text", "vision"):
        layers = {int(m.group(1)) for k in shapes if (m := re.search(rf"{part}_model\.encoder\.layers\.(\d+)\.", k))}
        wanted = getattr(config, f"{part}_config").num_hidden_layers
        if wanted > len(layers):
            raise UserError(f"{path / 'config.json'} asks for {wanted} {part} layers; the weights hold {len(layers)}",
                            hint)
    with torch.device("meta"):
        wanted = sum(p.numel() for p in CLIPModel(config).parameters())
    held = sum(math.prod(s) for s in shapes.values())
    if wanted > held * 1.1 + 1000:  # some slack: a checkpoint may leave out a few weights that are initialised
        raise UserError(f"{path / 'config.json'} describes a CLIP model of {wanted:,} parameters; its weights hold "
                        f"{held:,}", hint)


def _features(out) -> torch.Tensor:
    # transformers returns the projected embedding (a tensor, or an output object holding it as pooler_output)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _mean(xs: list[float]) -> float | None:
    """The mean of the finite scores (None without any): a NaN or infinite score, from weights that overflow, is
    left out (and counted), never written as a bare NaN, which is not JSON."""
    finite = [x for x in xs if math.isfinite(x)]
    return round(float(np.mean(finite)), 5) if finite else None


def _non_finite(*scores: list[float]) -> int:
    return sum(not math.isfinite(x) for xs in scores for x in xs)


def evaluate_movie(clip: Clip, movie_dir: Path, anchor_dirs: list[Path]) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(movie_dir / "manifest.json")
    except DamagedManifest as exc:
        log.warning("%s: manifest damaged (%s): skipped; `render` again rebuilds it", movie_dir, exc)
        return None
    if not manifest or not manifest.get("frames"):
        return None
    movie = parse_plan(manifest["movie"], source=str(movie_dir / "manifest.json"))[0].movie
    entries = [e for e in manifest["frames"] if (movie_dir / e["file"]).is_file()]
    by_id = {f.id: f for f in movie.frames}
    emb = clip.images([movie_dir / e["file"] for e in entries])
    text = clip.texts([e["prompt"] for e in entries])
    clip_t = (emb * text).sum(-1).tolist()
    names = [frame_characters(movie, by_id[e["id"]]) if e["id"] in by_id else [] for e in entries]
    shared = [float(emb[i] @ emb[j]) for i, j in itertools.combinations(range(len(entries)), 2)
              if set(names[i]) & set(names[j])]
    # Anchors: this render's own, else those of the same movie in another evaluated folder.
    anchor_files: dict[str, Path] = {}
    for d in [movie_dir, *anchor_dirs]:
        try:
            m = read_manifest(d / "manifest.json") or {}
        except DamagedManifest:
            m = {}
        for a in m.get("anchors", []):
            if a["character"] not in anchor_files and (d / a["file"]).is_file():
                anchor_files[a["character"]] = d / a["file"]
    anchor = []
    if anchor_files:
        chars = sorted(anchor_files)
        a_emb = dict(zip(chars, clip.images([anchor_files[c] for c in chars])))
        anchor = [float(emb[i] @ a_emb[c]) for i, ns in enumerate(names) for c in ns if c in a_emb]
    mode = manifest.get("settings", {}).get("consistency", {}).get("mode", "none")
    row = {"movie": movie.id, "consistency": mode, "frames": len(entries), "clip_t": _mean(clip_t),
           "clip_i_shared": _mean(shared), "shared_pairs": len(shared), "clip_i_anchor": _mean(anchor),
           "anchor_pairs": len(anchor)}
    if bad := _non_finite(clip_t, shared, anchor):
        row["non_finite_scores"] = bad  # left out of the means
    return row


def evaluate(outs: list[Path], clip_path: str | Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Scores of every movie in each output folder; writes OUT/eval.json per folder and returns one report per
    folder ({"out", "movies", "overall"})."""
    for out in outs:
        if not Path(out).is_dir():
            raise UserError(f"output folder not found: {out}", "pass the --out folder of a render")
    clip = Clip(clip_path, device)
    reports = []
    for out in map(Path, outs):
        movies = []
        for manifest in sorted(out.glob("*/manifest.json")):
            others = [Path(o) / manifest.parent.name for o in outs if Path(o) != out]
            row = evaluate_movie(clip, manifest.parent, others)
            if row:
                movies.append(row)
        overall = {k: _mean([m[k] for m in movies if m[k] is not None]) for k in ("clip_t", "clip_i_shared",
                                                                                  "clip_i_anchor")}
        report = {"format": EVAL_FORMAT, "out": str(out), "clip": str(clip_path), "movies": movies,
                  "overall": overall}
        atomic_write_text(out / "eval.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
        reports.append(report)
    return reports
