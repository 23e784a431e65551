"""Loading a model (SD 1.x, SD 2.x, SDXL; FLUX.1 and FLUX.2 [klein] through their families, engine.families) from a
local folder or single file -- never a hub.

Components are loaded one by one (not through `DiffusionPipeline`) so that unused parts such as the safety checker
are never read, and so a broken component is named in the error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from diffusers import AutoencoderKL, UNet2DConditionModel
from pydantic import ValidationError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from movielm_fast.errors import UserError
from movielm_fast.export.specs import DIT_SAMPLE_SIZE
from movielm_fast.paths import sha256_files
from movielm_fast.plan import MODEL_SETTINGS, RenderSettings

from .demo import DEMOS, demo_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".onnx")
DEFAULTS_FILE = "movielm_defaults.json"
"""A model folder's own render defaults (plan.MODEL_SETTINGS, any of them), and optionally "skip_style_training":
why style training cannot help it; as the demo models ship them. Not part of the content hash: it changes no pixel
of a frame whose settings are given."""


@dataclass
class ModelBundle:
    """Everything the engine needs from a model, with no knowledge of which backend will run it.

    A bundle may be partial: an SDXL refiner has no VAE (the base model's decodes), a swapped VAE is a bundle with
    only a VAE. Each has its own id and content hash, so its exported artifacts are cached under its own name."""

    kind: str  # "sd" (SD 1.x/2.x), "sdxl", "flux1" or "flux2-klein" (engine.families), "vae" (a VAE alone)
    model_id: str
    path: Path
    content_hash: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False  # SDXL refiner: an aesthetic score replaces the target size in time ids
    latent_scale: int = 8  # image pixels per latent pixel, for a bundle without a VAE
    load_seconds: dict[str, float] = field(default_factory=dict)  # run.startup: weights, tokenizers, hash
    transformer: Any = None  # the denoiser of the transformer families (FLUX.1, FLUX.2), which have no UNet
    distilled: bool = False  # FLUX.2 [klein]: step-wise distilled (model_index.json is_distilled): no CFG

    @property
    def family(self):
        """The model family (engine.families) that renders this bundle."""
        from .families import family_of

        return family_of(self)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else self.latent_scale

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels if self.unet is not None else self.vae.config.latent_channels)

    @property
    def time_ids(self) -> int:
        """SDXL size/crop conditioning numbers: 6 (original size, crop, target size), or 5 for a refiner
        (original size, crop, aesthetic score)."""
        return 5 if self.requires_aesthetics_score else 6


def _hash_files(files: list[Path], root: Path) -> str:
    """sha256 over (relative name, content) of every weight file (each file's digest memoised: paths.sha256_files)."""
    h = hashlib.sha256()
    files = sorted(files)
    for f, digest in zip(files, sha256_files(files)):
        h.update(str(f.relative_to(root) if f != root else f.name).encode())
        h.update(digest.encode())
    return h.hexdigest()[:16]


def content_hash(path: Path) -> str:
    if path.is_file():
        return _hash_files([path], path)
    files = [p for p in path.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".json"))
             and p.name != DEFAULTS_FILE]
    return _hash_files(files, path)


def native_size(model: ModelBundle) -> int:
    """The square size the model was trained at: its UNet's latent sample size times the VAE's factor (512 SD 1.x,
    768 SD 2.x-768, 1024 SDXL, 64 the demo model); a transformer's is no config's: its folder's own default width
    (64 the DiT demo model), else the FLUX pipelines' default_sample_size (1024 px)."""
    if getattr(model, "transformer", None) is not None:
        return int(own_defaults(model).get("width") or DIT_SAMPLE_SIZE * model.vae_scale_factor)
    size = model.unet.config.sample_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"{model.path / 'unet' / 'config.json'}: sample_size {size!r} is not a positive whole number",
                        "use the config.json the UNet's weights were saved with")
    return size * model.vae_scale_factor


def own_defaults(model: ModelBundle) -> dict[str, Any]:
    """The model's own `movielm_defaults.json` ({} where it ships none)."""
    path = model.path / DEFAULTS_FILE
    if not model.path.is_dir() or not path.is_file():
        return {}
    try:
        own = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})",
                        f"fix it or delete it; it may hold {', '.join(MODEL_SETTINGS)}") from None
    return own if isinstance(own, dict) else {}


def model_defaults(model: ModelBundle) -> dict[str, Any]:
    """Render settings the model brings for what neither the command line nor the plan sets: its native size, a
    transformer family's steps, guidance and scheduler (engine.families), and the steps and guidance of its own
    `movielm_defaults.json` where it ships one (movielm_fast.plan's cascade puts these between the plan and the
    built-in defaults)."""
    native = native_size(model)
    family = getattr(model, "family", None)  # (a stand-in bundle may have none)
    kind = family.defaults(model) if family is not None else {}
    own = own_defaults(model)
    defaults = {"width": native, "height": native, **kind,
                **{k: own[k] for k in MODEL_SETTINGS if own.get(k) is not None}}
    try:
        RenderSettings(**defaults)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = model.path / DEFAULTS_FILE if err["loc"][0] in own else model.path / "unet" / "config.json"
        raise UserError(f"{where}: {err['loc'][0]} {err['input']!r}: {err['msg'].removeprefix('Value error, ')}",
                        f"fix it, or delete {DEFAULTS_FILE} (it may hold {', '.join(MODEL_SETTINGS)})") from None
    return defaults


def style_training_note(model: ModelBundle) -> str | None:
    """Why style training cannot help this model (its `movielm_defaults.json` "skip_style_training", or its
    family's reason), or None."""
    note = own_defaults(model).get("skip_style_training")
    return note if isinstance(note, str) and note else model.family.no_style_training


def size_warning(width: int, height: int, native: int) -> str | None:
    """One line when a frame size is far (beyond a factor of 2 on a side) from the model's native one: such frames
    repeat or lose their subjects, and on the demo model mean nothing."""
    if native / 2 <= width <= native * 2 and native / 2 <= height <= native * 2:
        return None
    return (f"{width}x{height} is far from this model's native {native}x{native}: its frames will likely repeat or "
            f"lose their subjects; leave --width/--height (and render.width/height) unset to get {native}x{native}")


def _load_hint(exc: Exception, otherwise: str) -> str:
    """What to do about a component that would not load: a missing Python package is not a broken folder."""
    text = str(exc)
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if missing or "library but it was not found in your environment" in text or "pip install" in text:
        package = missing or (re.search(r"requires the (\S+) library", text) or [None, "the package named above"])[1]
        return f"a Python package it needs is missing: pip install {package} (into this environment), then rerun"
    return otherwise


def _load(cls, path: Path, subfolder: str, dtype, device=None):
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        if device is not None:
            # Each tensor is cast and placed as it is read: no full-precision copy of the module in host memory.
            kwargs["device_map"] = {"": device}
        return cls.from_pretrained(path, subfolder=subfolder, local_files_only=True, **kwargs)
    except Exception as exc:  # diffusers/transformers raise many types for a broken folder
        raise UserError(f"cannot load the model's {subfolder!r} from {path}: {str(exc).splitlines()[0][:300]}",
                        _load_hint(exc, "the folder is incomplete or corrupt: re-download or re-convert the model")
                        ) from None


def _load_tokenizer(path: Path, subfolder: str, cls=CLIPTokenizer):
    """`cls`: CLIP's tokenizer class, or transformers' AutoTokenizer (T5's and Qwen3's, by their folder's config)."""
    folder = Path(path) / subfolder
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
            and (folder / "merges.txt").is_file() or (folder / "spiece.model").is_file()):
        # transformers would build a tokenizer with an empty vocabulary here, without a word of warning, and every
        # prompt would become the same unknown tokens.
        raise UserError(f"{folder} has no tokenizer (no tokenizer.json, nor vocab.json and merges.txt)",
                        "copy the tokenizer folder of the model's original release into it")
    try:
        return cls.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer {subfolder!r} from {path}: {str(exc).splitlines()[0][:300]}",
                        "the folder needs the tokenizer files as diffusers saves them") from None


def _from_folder(path: Path, model_id: str, dtype, device=None, encoder_device=None) -> ModelBundle:
    from .families import loader_for

    try:
        index = json.loads((path / "model_index.json").read_text())
    except ValueError as exc:
        raise UserError(f"{path / 'model_index.json'} is not valid JSON ({exc})",
                        "the model folder is damaged: download or save it again") from None
    family = loader_for(index.get("_class_name", ""))
    return (family.load if family is not None else load_sd_folder)(path, index, model_id, dtype, device,
                                                                   encoder_device)


def load_sd_folder(path: Path, index: dict[str, Any], model_id: str, dtype, device=None,
                   encoder_device=None) -> ModelBundle:
    """A Stable Diffusion (1.x, 2.x, SDXL) diffusers folder; any other pipeline class is refused here."""
    encoder_device = device if encoder_device is None else encoder_device
    cls_name = index.get("_class_name", "")
    if "XL" in cls_name:
        kind = "sdxl"
        if _is_refiner(index):
            raise UserError(f"{path} is an SDXL refiner ({cls_name}); it cannot render from text alone",
                            f"use an SDXL base model as --model, and this folder as --refiner {path}")
    elif cls_name.startswith("StableDiffusion"):
        kind = "sd"
    else:
        raise UserError(f"{path} holds a {cls_name or 'unknown'} pipeline; movielm-fast renders Stable Diffusion "
                        "1.x/2.x, SDXL, FLUX.1 and FLUX.2 [klein] text-to-image models",
                        "pass a folder saved by StableDiffusion(XL)Pipeline, FluxPipeline or Flux2KleinPipeline")
    tokenizer_folders = ["tokenizer"] + (["tokenizer_2"] if kind == "sdxl" else [])
    seconds: dict[str, float] = {}
    # The content hash (file reads, hashlib releases the GIL) and the tokenizers (JSON) run beside the weights;
    # the modules load one at a time on this thread (accelerate's empty-weights context is process-wide).
    with ThreadPoolExecutor(2, thread_name_prefix="movielm-load") as pool:
        hashed = pool.submit(_timed, seconds, "content_hash", content_hash, path)
        tokenized = pool.submit(_timed, seconds, "model_tokenizers",
                                lambda: [_load_tokenizer(path, sub) for sub in tokenizer_folders])
        t0 = time.perf_counter()
        try:
            encoders = [_load(CLIPTextModel, path, "text_encoder", dtype, encoder_device)]
            if kind == "sdxl":
                encoders.append(_load(CLIPTextModelWithProjection, path, "text_encoder_2", dtype, encoder_device))
            unet = _load(UNet2DConditionModel, path, "unet", dtype, device)
            vae = _load(AutoencoderKL, path, "vae", _vae_load_dtype(path, dtype), device)
            seconds["model_weights"] = time.perf_counter() - t0
        finally:  # a broken component's UserError wins; the threads end either way
            tokenizers, digest = tokenized.result(), hashed.result()
    return ModelBundle(
        kind=kind, model_id=model_id, path=path, content_hash=digest, unet=unet, vae=vae, text_encoders=encoders,
        tokenizers=tokenizers, scheduler_config=_read_scheduler_config(path),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")),
        load_seconds=seconds)


def _timed(seconds: dict[str, float], name: str, fn, *args):
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        seconds[name] = time.perf_counter() - t0


def _vae_load_dtype(path: Path, dtype):
    """The dtype the VAE is loaded in: the one it will run in (export.specs.component_dtype: a VAE whose config
    says it overflows in fp16 stays fp32), so it is never cast twice."""
    if dtype is None:
        return None
    from movielm_fast.export.specs import VAE_DECODER, component_dtype

    from .config import dtype_name, torch_dtype

    try:
        config = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        config = {}  # the VAE's own load names the problem
    stub = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(**config)))
    return torch_dtype(component_dtype(stub, VAE_DECODER, dtype_name(dtype)))


def _is_refiner(index: dict[str, Any]) -> bool:
    return "Img2Img" in index.get("_class_name", "") or not (index.get("text_encoder") or [None])[0]


def _read_scheduler_config(path: Path) -> dict[str, Any]:
    sched_file = path / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(sched_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {sched_file}: {exc}", "the model folder is incomplete") from None


def check_refiner(path: str | os.PathLike) -> dict[str, Any]:
    """The model_index.json of an SDXL refiner folder; a UserError saying what the folder is otherwise. Reads one
    small file, so plans are checked before any model loads."""
    path = Path(path).expanduser()
    hint = "pass a diffusers SDXL refiner folder (StableDiffusionXLImg2ImgPipeline, e.g. stable-diffusion-xl-" \
           "refiner-1.0) as --refiner / render.refiner"
    if not path.is_dir():
        raise UserError(f"refiner not found: {path} is not a folder", hint)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} has no readable model_index.json, so it is not a diffusers model folder",
                        hint) from None
    cls_name = index.get("_class_name", "")
    if "XL" not in cls_name:
        raise UserError(f"{path} holds a {cls_name or 'unknown'} pipeline, not an SDXL refiner", hint)
    if not _is_refiner(index):
        raise UserError(f"{path} is an SDXL base model ({cls_name}), not a refiner",
                        f"pass it as --model; {hint}")
    if not (index.get("text_encoder_2") or [None])[0]:
        raise UserError(f"{path} has no text_encoder_2", hint)
    return index


def load_refiner(path: str | os.PathLike, dtype=None) -> ModelBundle:
    """An SDXL refiner folder as a partial bundle: its UNet and its one text encoder (text_encoder_2), no VAE."""
    path = Path(path).expanduser()
    index = check_refiner(path)
    vae_config = path / "vae" / "config.json"
    try:  # the refiner's latent grid, read from its own VAE's config without loading the VAE
        scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        scale = 8
    return ModelBundle(
        kind="sdxl", model_id=path.name, path=path, content_hash=content_hash(path),
        unet=_load(UNet2DConditionModel, path, "unet", dtype), vae=None,
        text_encoders=[_load(CLIPTextModelWithProjection, path, "text_encoder_2", dtype)],
        tokenizers=[_load_tokenizer(path, "tokenizer_2")], scheduler_config=_read_scheduler_config(path),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)), latent_scale=scale)


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def vae_folder(path: str | os.PathLike) -> tuple[Path, str]:
    """(the folder holding the VAE's config.json, its class name); a model folder's vae/ subfolder is accepted.
    Reads one small file, so plans are checked before any model loads."""
    path = Path(path).expanduser()
    hint = "pass a diffusers AutoencoderKL or AutoencoderTiny folder (config.json + weights) as --vae / render.vae"
    if not path.is_dir():
        raise UserError(f"VAE not found: {path} is not a folder", hint)
    folder = path if (path / "config.json").is_file() else path / "vae"
    try:
        cls_name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        raise UserError(f"{path} has no readable config.json, so it is not a diffusers VAE folder", hint) from None
    if cls_name not in VAE_CLASSES:
        raise UserError(f"{path} holds a {cls_name or 'unknown'} model, not a VAE", hint)
    return folder, cls_name


def load_vae(path: str | os.PathLike, dtype=None) -> ModelBundle:
    """A VAE folder as a partial bundle (only a VAE). AutoencoderTiny (TAESD) decodes the UNet's scaled latents
    directly: its config's scaling_factor is 1.0, so the decoder graph's division is a no-op for it."""
    from diffusers import AutoencoderTiny

    folder, cls_name = vae_folder(path)
    cls = AutoencoderTiny if cls_name == "AutoencoderTiny" else AutoencoderKL
    try:
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        vae = cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as exc:
        raise UserError(f"cannot load the VAE from {folder}: {str(exc).splitlines()[0][:300]}",
                        _load_hint(exc, "the folder is incomplete or corrupt: re-download or re-convert it")) from None
    return ModelBundle(kind="vae", model_id=Path(path).name, path=folder, content_hash=content_hash(folder),
                       unet=None, vae=vae, text_encoders=[], tokenizers=[], scheduler_config={})


PARTS = {"refiner": load_refiner, "vae": load_vae}
"""The parts a run may add to a loaded model, by role: each loads as a partial bundle."""


def load_part(role: str, path: str | os.PathLike, base: ModelBundle) -> ModelBundle:
    """A refiner or a VAE (`role`) for the loaded model `base`: loaded, then checked against it, with one message
    for every part that does not fit."""
    if role == "refiner" and base.kind != "sdxl":
        raise UserError(f"the refiner {path} is for SDXL; the model {base.model_id} is "
                        f"{'SD 1.x/2.x' if base.kind == 'sd' else base.kind}",
                        "use an SDXL base model with --refiner, or render without the refiner")
    part = PARTS[role](path)
    if (part.latent_channels, part.vae_scale_factor) != (base.latent_channels, base.vae_scale_factor):
        raise UserError(f"the {role} {path} works on {part.latent_channels}-channel latents at 1/"
                        f"{part.vae_scale_factor} scale; the model {base.model_id} makes {base.latent_channels}-"
                        f"channel latents at 1/{base.vae_scale_factor}",
                        f"use a {role} of the model's family (SD 1.x/2.x and SDXL: 4 channels, 1/8)")
    return part


def _from_single_file(path: Path, dtype) -> ModelBundle:
    # Only this path needs the pipeline classes, whose import pulls in transformers' image processors (seconds, and
    # warnings without torchvision): imported here, not for every folder model.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _check_safetensors(path)
    errors = []
    for cls in (StableDiffusionXLPipeline, StableDiffusionPipeline) if "xl" in path.name.lower() else \
            (StableDiffusionPipeline, StableDiffusionXLPipeline):
        try:
            pipe = cls.from_single_file(str(path), local_files_only=True, torch_dtype=dtype)
            break
        except Exception as exc:
            errors.append(str(exc).splitlines()[0][:200])
    else:
        raise UserError(
            f"cannot load the single-file checkpoint {path} offline ({errors[-1]})",
            "convert it to a diffusers folder once, on a machine that has its config: "
            "`StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)` (StableDiffusionXLPipeline for "
            "SDXL), then pass --model DIR")
    kind = "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd"
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    return ModelBundle(kind=kind, model_id=path.stem, path=path, content_hash=content_hash(path), unet=pipe.unet,
                       vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                       scheduler_config=dict(pipe.scheduler.config), force_zeros_for_empty_prompt=kind == "sdxl")


def _check_safetensors(path: Path) -> None:
    """A damaged .safetensors file is named as such, before diffusers reports it as a missing config."""
    if path.suffix != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:
        raise UserError(f"{path} is not a readable .safetensors file ({str(exc).splitlines()[0][:200]}): it is "
                        "truncated or damaged", "download it again (compare its size or sha256 with the source's), "
                        "then pass it to --model") from None


_STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                 "I8": 1, "U8": 1, "BOOL": 1}


def weights_bytes(folder: Path, itemsize: int) -> int:
    """Bytes the safetensors weights in `folder` take once loaded with floating-point tensors of `itemsize` bytes
    (the others as stored), read from the files' headers alone."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fp:
            header = json.loads(fp.read(int.from_bytes(fp.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                size = itemsize if t["dtype"].startswith(("F", "BF")) else _STORED_BYTES.get(t["dtype"], 4)
                total += size * int(np.prod(t["shape"], dtype=np.int64))
    return total


def fit_problem(model_id: str, dtype_name: str, parts: dict[str, int], free: int, offload: bool
                ) -> UserError | None:
    """The error when the weights of `parts` (folder -> bytes) cannot fit in `free` device bytes, its hint listing
    what would make them fit; None when they fit. Offloaded text encoders wait in host memory: they do not count."""
    on_device = {k: v for k, v in parts.items() if not (offload and k.startswith("text_encoder"))}
    need = sum(on_device.values())
    if need <= free:
        return None
    gib = 2 ** 30
    listed = ", ".join(f"{k} {v / gib:.1f}" for k, v in sorted(on_device.items(), key=lambda kv: -kv[1]))
    encoders = sum(v for k, v in on_device.items() if k.startswith("text_encoder"))
    ways = ([f"--offload-text-encoders (the text encoders wait in host memory: {encoders / gib:.1f} GiB less)"]
            if encoders else []) + [
        "FP8 weights (--quantize; not yet for every model family: docs/models.md)",
        "a GPU with more free memory (other processes may hold some: nvidia-smi)"]
    return UserError(f"{model_id} needs about {need / gib:.1f} GiB of device memory for its weights in {dtype_name} "
                     f"({listed} GiB) and {free / gib:.1f} GiB is free; a smaller --batch-size lowers only the "
                     "activations", "what would make it fit: " + "; ".join(ways))


def check_fits(spec: str | os.PathLike, dtype, device, offload: bool) -> None:
    """Before a folder model loads onto a CUDA device: a UserError listing what would make its weights fit, when
    they cannot (instead of an out-of-memory error part-way through loading)."""
    import torch

    path = Path(spec).expanduser()
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # the demo, single files, broken folders: loading says what they are
    parts = {k: weights_bytes(path / k, torch.finfo(dtype).bits // 8) for k, v in index.items()
             if isinstance(v, list) and (path / k).is_dir()}
    free, _ = torch.cuda.mem_get_info(device)
    problem = fit_problem(path.name, str(dtype).removeprefix("torch."), parts, free, offload)
    if problem is not None:
        raise problem


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MOVED_HUB_IDS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
"""Hub repositories that were removed, and where their weights are now."""


def load_model(spec: str | os.PathLike, dtype=None, *, target: tuple | None = None) -> ModelBundle:
    """`spec` is "demo" or "demo-dit", a diffusers folder (with model_index.json) or a .safetensors/.ckpt single file.

    `target`: (torch dtype, torch device[, text encoders' device]) the modules of a folder model run in: each is
    loaded straight into that dtype (the VAE stays fp32 where its config says fp16 overflows) and onto that device,
    instead of a float32 copy on the host that the backend then casts and copies; the text encoders onto their own
    device where one is given (offloaded: the host). A single file loads as its pipeline class does."""
    dtype, device, *home = target if target is not None else (dtype, None)
    encoder_device = home[0] if home else device
    if str(spec) in DEMOS:
        return _from_folder(demo_model_path(str(spec)), str(spec), dtype, device, encoder_device)
    path = Path(spec).expanduser()
    if not path.exists():
        if HUB_ID.match(str(spec)):
            hub_id = MOVED_HUB_IDS.get(str(spec), str(spec))
            moved = f" ({spec} was removed from the hub; its weights are at {hub_id})" if hub_id != str(spec) else ""
            local = f"models/{Path(hub_id).name}"
            raise UserError(f"model not found: {spec} is not a local folder; it looks like a Hugging Face hub id, and "
                            f"movielm-fast never downloads at run time{moved}",
                            f"download it once: `huggingface-cli download {hub_id} --local-dir {local}` (or `hf "
                            f"download {hub_id} --local-dir {local}`), then pass --model {local}")
        raise UserError(f"model not found: {path}", "pass --model demo (or demo-dit) or a local diffusers folder "
                                                   "(model_index.json)")
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"{path} is not a model checkpoint", "pass a diffusers folder or a .safetensors file")
        return _from_single_file(path, None if target is not None else dtype)
    if not (path / "model_index.json").exists():
        raise UserError(f"{path} has no model_index.json, so it is not a diffusers model folder",
                        "pass the folder that contains model_index.json (as saved by save_pretrained)")
    return _from_folder(path, path.name, dtype, device, encoder_device)
