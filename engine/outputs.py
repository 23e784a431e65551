"""Files a render produces: frames (PNG with text chunks), manifest.json, storyboard.png -- all written atomically."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .paths import atomic_write_text

MANIFEST_FORMAT = "movielm-fast/manifest@1"


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
