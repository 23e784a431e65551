"""Files a render produces: frames (PNG with text chunks), manifest.json, storyboard.png -- all written atomically."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .errors import UserError

MANIFEST_FORMAT = "movielm-fast/manifest@1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see the old or the new file,
    never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (PermissionError, NotADirectoryError, FileExistsError) as exc:
        raise UserError(f"cannot write to {path.parent}: {exc.strerror or exc}",
                        "choose a writable folder with --out") from None
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}",
                            "free some space and run the same command again; finished frames are kept") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def png_bytes(image: np.ndarray, text: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: frames are checked against their files anyway
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def storyboard(frames: list[tuple[str, str, Path]], columns: int = 4, thumb: int = 256) -> bytes:
    """A contact sheet: each frame's thumbnail with its id and dialogue underneath. frames: (id, dialogue, file)."""
    font = _font(14)
    caption_h = 4 + 18 * 4
    thumbs = []
    for frame_id, dialogue, file in frames:
        with Image.open(file) as im:
            im = im.convert("RGB")
            im.thumbnail((thumb, thumb))
            thumbs.append((frame_id, dialogue, im.copy()))
    cols = max(1, min(columns, len(thumbs)))
    rows = (len(thumbs) + cols - 1) // cols
    cell_w, cell_h = thumb + 16, thumb + caption_h + 16
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (frame_id, dialogue, im) in enumerate(thumbs):
        x, y = (i % cols) * cell_w + 8, (i // cols) * cell_h + 8
        sheet.paste(im, (x + (thumb - im.width) // 2, y))
        lines = [f"#{frame_id}"] + (textwrap.wrap(f"\u201c{dialogue}\u201d", width=34)[:3] if dialogue else [])
        for k, line in enumerate(lines):
            draw.text((x, y + thumb + 4 + 18 * k), line, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
