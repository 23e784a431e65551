"""Copy a trained toy model into the package as a demo model: `python -m movielm_fast.bench.toy.ship TRAINED_DIR`.

TRAINED_DIR is bench.toy.train's output (a StableDiffusionPipeline folder: it ships as `--model demo`, in
engine/demo_model) or bench.toy.train_dit's (a FluxPipeline folder: `--model demo-dit`, engine/demo_dit_model).
What ships is small (a few MB): weights as float16 safetensors (loaded back as float32, or whatever dtype the
engine asks for), and the CLIP text encoder's rows for tokens the toy world never uses set to zero -- they were
never trained, only decayed from their random start, and zero rows compress to nothing in git. The CLIP tokenizer is not
shipped: `engine.demo` rebuilds the standard CLIP tokenizer from open-clip's vocabulary file; the DiT demo's T5
tokenizer (a few KB) is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from movielm_fast.engine.demo import TOY_DIT_MODEL_DIR, TOY_MODEL_DIR, clip_tokenizer
from movielm_fast.engine.models import DEFAULTS_FILE
from movielm_fast.paths import replace_dir

from ..args import bench_parser
from . import world as W

_UNET, _MODEL = "diffusion_pytorch_model.safetensors", "model.safetensors"
# model_index.json's pipeline -> (the shipped folder, weights by component, folders copied as they are)
_LAYOUTS = {"StableDiffusionPipeline": (TOY_MODEL_DIR, {"unet": _UNET, "vae": _UNET, "text_encoder": _MODEL}, ()),
            "FluxPipeline": (TOY_DIT_MODEL_DIR, {"transformer": _UNET, "vae": _UNET, "text_encoder": _MODEL,
                                                 "text_encoder_2": _MODEL}, ("tokenizer_2",))}


def toy_vocabulary() -> list[int]:
    """Every token id a toy-world caption (either style order, no style, empty, attributes left open) or a
    training paraphrase (world.paraphrase) can contain, for CLIP's tokenizer."""
    words = [*W.COLOURS, *W.SHAPES, *W.BACKGROUND_PHRASES.values(), *W.STYLES, "big", "small", "a", "an", "and",
             "empty", "scene", "style", "on the left", "in the centre", "on the right", ",", "sepia style, x",
             "nothing", W.OPEN_SHAPE, *(w for table in (W.SIZE_WORDS, W.POS_WORDS, W.BACKGROUND_WORDS)
                          for synonyms in table.values() for w in synonyms)]
    tok = clip_tokenizer()
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    for w in words:
        ids.update(tok(w, add_special_tokens=False).input_ids)
    return sorted(ids)


def ship(src: Path, dest: Path | None = None, vae_weights: Path | None = None) -> None:
    """`vae_weights`: a VAE fine-tuned with its encoder frozen (train --decoder-only) replaces src's weights; its
    config is src's, which holds the latent scaling factor the UNet was trained with."""
    pipeline = json.loads((src / "model_index.json").read_text())["_class_name"]
    home, weights, copied = _LAYOUTS[pipeline]
    dest = dest or home
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(src / "model_index.json", tmp / "model_index.json")
    # The model's render defaults are the shipped folder's (training does not write them): kept across a re-ship.
    defaults = next((f for f in (src / DEFAULTS_FILE, dest / DEFAULTS_FILE) if f.exists()), None)
    if defaults:
        shutil.copy(defaults, tmp / DEFAULTS_FILE)
    info = json.loads((src / "training.json").read_text()) if (src / "training.json").exists() else {}
    if vae_weights:
        record = vae_weights.parent.parent / "vae_training.json"
        info["decoder_finetune"] = json.loads(record.read_text()) if record.exists() else str(vae_weights)
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    (tmp / "scheduler").mkdir()
    shutil.copy(src / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    for folder in copied:
        shutil.copytree(src / folder, tmp / folder)
    # CLIP's 49408 rows are mostly words the toy world never uses (zero rows compress to nothing); the DiT demo's T5
    # table is small and all of it (whole toy words, then letters that spell any other word) is kept as trained.
    keep = {"text_encoder": torch.tensor(toy_vocabulary())}
    for folder, fname in weights.items():
        (tmp / folder).mkdir()
        config = json.loads((src / folder / "config.json").read_text())
        config.pop("_name_or_path", None)  # where it was trained: a path on the training machine
        (tmp / folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = load_file(str(vae_weights if folder == "vae" and vae_weights else src / folder / fname))
        for key in [k for k in state if folder in keep and k.endswith("embeddings.token_embedding.weight")]:
            table = torch.zeros_like(state[key])
            table[keep[folder]] = state[key][keep[folder]]
            state[key] = table
        save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(tmp / folder / fname))
    replace_dir(tmp, dest)
    print(json.dumps({"shipped": str(dest), "tokens_kept": {k: len(v) for k, v in keep.items()},
                      "bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}))


def main(argv=None) -> None:
    ap = bench_parser("toy.ship", __doc__)
    ap.add_argument("src", type=Path)
    ap.add_argument("--dest", type=Path, default=None, help="default: the package's folder for the model's pipeline")
    ap.add_argument("--vae-weights", type=Path, default=None,
                    help="diffusion_pytorch_model.safetensors of a decoder fine-tuned on src's frozen encoder")
    args = ap.parse_args(argv)
    ship(args.src, args.dest, args.vae_weights)


if __name__ == "__main__":
    main()
