"""Frame files and the metadata inside them: PNG with text chunks, or JPEG/WebP with the same metadata as EXIF,
each also with A1111's "parameters" text, so that a frame can be reproduced (or read by other tools) on its own."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

from movielm_fast.engine.families import family_by_kind
from movielm_fast.errors import UserError

if TYPE_CHECKING:
    from .tasks import FrameTask, ModelInfo

IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = {"jpg": 95, "webp": 90}
EXIF_IMAGE_DESCRIPTION = 0x010E
# Our scheduler names as A1111 names its samplers ("DPM++ 2M" is diffusers' dpmsolver++ multistep, order 2).
A1111_SAMPLERS = {"dpmpp": "DPM++ 2M", "dpmpp_sde": "DPM++ 2M SDE", "euler": "Euler", "euler_a": "Euler a",
                  "ddim": "DDIM", "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD", "pndm": "PLMS"}


def _saved(im: Image.Image, format: str, **save_args: Any) -> bytes:
    """The file Pillow writes for `im`, as bytes. Pillow's JPEG encoder holds the GIL while it writes into a
    BytesIO, but not while it writes to a file descriptor: on the writer threads a BytesIO stalled the render
    loop beside them (bench/RESULTS.md, "Host-side throughput", has the render thread's cost per frame), so where
    the OS has anonymous in-memory files a JPEG is encoded into one and read back (the same bytes). PNG (zlib) and
    WebP release the GIL either way, and the detour would only cost them time."""
    if format != "JPEG" or not hasattr(os, "memfd_create"):  # memfd: Linux
        buf = io.BytesIO()
        im.save(buf, format=format, **save_args)
        return buf.getvalue()
    with open(os.memfd_create("movielm-frame", os.MFD_CLOEXEC), "w+b") as fp:
        im.save(fp, format=format, **save_args)
        fp.seek(0)
        return fp.read()


def png_bytes(image: np.ndarray, text: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        if key == "parameters":  # as A1111 writes it: tEXt, or iTXt where the text is not Latin-1
            info.add_text(key, value)
        else:
            info.add_itxt(key, value)
    return _saved(Image.fromarray(image), format="PNG", pnginfo=info)


def resolve_quality(fmt: str, quality: int | None) -> int | None:
    """The encoder quality a format uses (None for lossless PNG); checks the user's choice."""
    if fmt not in IMAGE_FORMATS:
        raise UserError(f"unknown image format {fmt!r}", f"use one of: {', '.join(IMAGE_FORMATS)}")
    if fmt == "png":
        return None
    q = DEFAULT_QUALITY[fmt] if quality is None else quality
    if not 1 <= q <= 100:
        raise UserError(f"--quality {q} is out of range", "use 1-100 (95 is visually lossless for JPEG)")
    return q


LOSSY_KEYS = ("step_cache", "quantize")  # frame-key entries of lossy speed-ups, present only when used
OPTIONAL_KEYS = ("true_cfg",)  # frame-key entries present only when set (FLUX.1's true CFG)


def frame_metadata(task: FrameTask, info: ModelInfo) -> dict[str, str]:
    """What a frame file carries so that it can be reproduced on its own: prompt, negative, seed, model, settings."""
    settings = {k: task.key[k] for k in ("width", "height", "steps", "guidance", "scheduler", "dtype")}
    settings.update({k: task.key[k] for k in OPTIONAL_KEYS if k in task.key})
    settings.update({k: task.key[k] for k in LOSSY_KEYS if k in task.key})  # opt-in lossy speed-ups, when used
    return {"prompt": task.job.prompt, "negative_prompt": task.job.negative_prompt, "seed": str(task.job.seed),
            "model": info.model_id, "model_hash": info.content_hash, "settings": json.dumps(settings)}


def a1111_parameters(meta: dict[str, str], kind: str = "sd") -> str:
    """The frame's settings as A1111 writes them (its "parameters" text, which A1111's PNG Info, ComfyUI's and
    Civitai's readers parse): the prompt, "Negative prompt: ..." when there is one, then "Key: value, ..." pairs;
    for the transformer families as Forge writes them (engine.families: its sampler, schedule and guidance pairs).
    No "Model hash": A1111's is a hash of the checkpoint file, which ours (of the whole model) is not."""
    s = json.loads(meta["settings"])
    sampling = family_by_kind(kind).a1111(s) or \
        {"Sampler": A1111_SAMPLERS.get(s["scheduler"], s["scheduler"]), "CFG scale": s["guidance"]}
    pairs = {"Steps": s["steps"], **sampling, "Seed": meta["seed"], "Size": f"{s['width']}x{s['height']}",
             "Model": meta["model"], "Version": "movielm-fast"}
    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in pairs.items()))
    return "\n".join(lines)


def _a1111_value(value: Any) -> str:
    """A value A1111's parser reads back whole: quoted as A1111's own `quote` does (JSON, when it holds a comma,
    colon or line break)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def encode_image(image: np.ndarray, task: FrameTask, info: ModelInfo, fmt: str = "png",
                 quality: int | None = None) -> bytes:
    """One frame's file: PNG with iTXt chunks, or JPEG/WebP with the same metadata as JSON in EXIF
    ImageDescription (readable with any EXIF tool). Both also carry A1111's "parameters" text (a PNG chunk; EXIF
    UserComment in JPEG/WebP, where A1111, ComfyUI and Civitai look). `quality`: as `resolve_quality` gave it."""
    meta = frame_metadata(task, info)
    parameters = a1111_parameters(meta, info.kind)
    if fmt == "png":
        return png_bytes(image, {**meta, "parameters": parameters})
    # piexif writes the EXIF block because A1111 reads it with piexif: its UserComment must be of type UNDEFINED
    # (Pillow writes bytes it has no type for as BYTE, which piexif reads back as a tuple of ints, and A1111's
    # reader then fails), big-endian with a "UNICODE" code and UTF-16-BE text, as A1111 itself writes it.
    exif = piexif.dump({
        "0th": {piexif.ImageIFD.ImageDescription: json.dumps(meta),  # ASCII: json escapes everything else
                piexif.ImageIFD.Software: "movielm-fast"},
        "Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(parameters, encoding="unicode")}})
    return _saved(Image.fromarray(image), format="JPEG" if fmt == "jpg" else "WEBP", quality=quality, exif=exif)


def read_frame_metadata(path: Path) -> dict[str, str]:
    """The metadata `encode_image` stored in a frame file, whatever its format."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return {k: v for k, v in im.text.items() if k != "parameters"}
        return json.loads(im.getexif()[EXIF_IMAGE_DESCRIPTION])

