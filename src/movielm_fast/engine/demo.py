"""The built-in demo model, and tiny random-weight models for tests.

"demo" is the toy model (`bench.toy`): a small Stable-Diffusion-architecture model trained on this project's
procedural toy world (64x64 scenes of coloured circles, squares and triangles on five backgrounds, in five styles).
"demo-dit" is its transformer sibling: a small FLUX.1-architecture model (joint-attention blocks, flow matching) on
the same VAE, trained on the same world (`bench.toy.train_dit`). Their weights ship inside the package
(`engine/demo_model`, `engine/demo_dit_model`, float16 safetensors); on first use they are copied, with the standard
CLIP tokenizer rebuilt from open-clip's vocabulary, into an ordinary diffusers folder in the cache, so everything
that loads a real model loads it the same way.

`build_tiny_pipeline` makes tiny SD 1.x / SDXL models with RANDOM weights: their images mean nothing, which is
what the parity tests want (any mismatch with diffusers shows; nothing depends on what is drawn).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
from functools import lru_cache
from pathlib import Path

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_dir, cache_root

DEMO_VERSION = "demo-toy-v1"
TOY_MODEL_DIR = Path(__file__).parent / "demo_model"
TOY_DIT_MODEL_DIR = Path(__file__).parent / "demo_dit_model"
DEMOS = {"demo": (TOY_MODEL_DIR, DEMO_VERSION), "demo-dit": (TOY_DIT_MODEL_DIR, "demo-dit-toy-v1")}
"""--model name -> (the shipped folder, the cache folder's prefix)."""
_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level BPE maps every byte to a printable unicode character so merges never see whitespace/control.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _clip_vocab_file() -> Path:
    # The vocabulary ships inside the open-clip-torch wheel; find it without importing open_clip (which needs
    # torchvision).
    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / _CLIP_VOCAB
        if path.exists():
            return path
    raise UserError("CLIP's BPE vocabulary was not found (needed only by the built-in demo model)",
                    "pip install --no-deps open-clip-torch  (or pass --model PATH to a real model folder)")


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The standard 49408-token CLIP vocabulary, built as CLIP builds it from the BPE merge list."""
    lines = gzip.open(_clip_vocab_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer  # here: naming a demo model (DEMOS) imports no transformers

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = max_length
    return tok


def _shipped_hash(folder: Path, name: str) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not (folder / "model_index.json").exists():
        raise UserError(f"the {name} model's weights are missing from {folder}",
                        "reinstall movielm-fast from a complete checkout, or pass --model PATH to a model folder")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def demo_model_path(name: str = "demo") -> Path:
    """The folder of demo model `name` (a key of DEMOS) in the cache, assembled on first use (atomically, so a
    crash never leaves half a model); keyed by the shipped weights, so new weights get a new folder."""
    folder, version = DEMOS[name]
    target = cache_root() / f"{version}-{_shipped_hash(folder, name)}"
    with atomic_dir(target, "model_index.json") as tmp:
        if tmp is not None:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            clip_tokenizer().save_pretrained(tmp / "tokenizer")
    return target


