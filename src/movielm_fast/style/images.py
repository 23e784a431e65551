"""The user's image folders: the images fitted to the training size, their caption files, and the captions used
for images without one."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from movielm_fast.errors import UserError
from movielm_fast.plan import limit, limit_hint

log = logging.getLogger("movielm_fast")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Captions for user images (their subjects are unknown). The token comes first, as in frame prompts ("<t>, ...").
IMAGE_TEMPLATES = ["{}, an image", "{}, a picture", "{}, a scene", "{}, a rendering", "{}, a frame from a movie"]


@dataclass
class TrainingImage:
    pixels: np.ndarray  # (res, res, 3) uint8
    caption_subject: str | None  # what it shows: a scene's subject, a user image's caption file; else None
    original_size: tuple[int, int]  # (h, w) before resizing -- SDXL's size conditioning
    crop_top_left: tuple[int, int]


def _fit(im, res: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to `res`, then centre-crop to res x res -- done as one resize of the part of the
    original that becomes the square, so an image of extreme shape (150000 x 1) never becomes a 9600000 x 64 one in
    between. The crop's corner is in resized pixels (SDXL's crop conditioning)."""
    w, h = im.size
    scale = res / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    left, top = (nw - res) // 2, (nh - res) // 2
    if (nw, nh) == (w, h):
        im = im.crop((left, top, left + res, top + res))
    else:
        box = (left / scale, top / scale, (left + res) / scale, (top + res) / scale)
        im = im.resize((res, res), Image.Resampling.LANCZOS, box=box)
    return np.asarray(im), (h, w), (top, left)


def load_images(folder: str | Path, res: int) -> tuple[list[TrainingImage], list[str], str]:
    """The folder's images fitted to res x res; returns (images, notes, digest of names + bytes + captions).
    A caption file beside an image (frame.png -> frame.txt, as kohya's and diffusers' trainers read them) says what
    the image shows, without the style: the token then learns the look, not the content."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}", "pass --images DIR, a folder of .png/.jpg files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})",
                        "put the style's example images in the folder, or leave out --images to render scenes")
    digest = hashlib.sha256()
    images, sizes = [], set()
    for f in files:
        data = f.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > limit("image_pixels"):  # read from the header: nothing decoded yet
                    raise UserError(f"image {f} is {im.width}x{im.height}: {im.width * im.height:,} pixels, over the "
                                    f"limit of {limit('image_pixels'):,}",
                                    f"shrink it (its training size is {res}x{res}), {limit_hint('image_pixels')}")
                im = ImageOps.exif_transpose(im).convert("RGB")
                sizes.add(im.size)
                pixels, original, crop = _fit(im, res)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"cannot read image {f}: {str(exc).splitlines()[0][:160]}",
                            "remove the file or re-save it as PNG/JPEG") from None
        caption_file = f.with_suffix(".txt")
        try:
            caption = " ".join(caption_file.read_text(encoding="utf-8").split()) if caption_file.is_file() else None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the caption file {caption_file}: {str(exc)[:160]}",
                            "save it as UTF-8 text (or remove it: the image is then used without a caption)") \
                from None
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(data).digest())
        if caption:  # folders without captions keep the digest they had: their tokens stay valid
            digest.update(b"caption\0" + caption.encode() + b"\0")
        images.append(TrainingImage(pixels, caption or None, original, crop))
    notes = []
    resized = [s for s in sizes if s != (res, res)]
    if resized:
        note = (f"{len(files)} image(s) in {len(sizes)} size(s) ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}): "
                f"resized (shorter side) and centre-cropped to {res}x{res}")
        log.warning(note)
        notes.append(note)
    return images, notes, digest.hexdigest()
