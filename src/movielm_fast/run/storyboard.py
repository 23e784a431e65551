"""The storyboard: a movie's contact sheet (storyboard.png, or pages of it with an index for a long movie) under its
title, each frame's thumbnail with its id, description and who says what, written atomically."""

from __future__ import annotations

import json
import logging
import struct
import textwrap
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from movielm_fast.paths import atomic_write_bytes, atomic_write_text

FRAMES_PER_PAGE = 256  # storyboard frames per file: 64 rows of 348 px, under image viewers' size limits

log = logging.getLogger("movielm_fast")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


THUMB = 256


def thumbnail(im: Image.Image) -> Image.Image:
    """A frame's storyboard thumbnail (the same from its pixels as from its lossless file)."""
    im = im.convert("RGB")
    if max(im.size) * 2 <= THUMB:  # tiny frames (the 64² demo model) are enlarged by a whole factor, pixels kept
        k = THUMB // max(im.size)
        return im.resize((im.width * k, im.height * k), Image.NEAREST)
    # reducing_gap=1: an integer factor (512 -> 256) is a box-filter reduce, several times cheaper than Pillow's
    # default bicubic pass over the full frame; any remainder is still resampled bicubically.
    im.thumbnail((THUMB, THUMB), reducing_gap=1.0)
    return im


CAPTION_LINES = 4  # under each thumbnail: its id and description, then who says what
CAPTION_H = 4 + 18 * CAPTION_LINES
TITLE_H = 36
Cell = tuple[str, str, str]
"""What a storyboard shows of a frame: (id, description, its line as `speaker: "dialogue"`, or "")."""


def cells(movie) -> list[Cell]:
    """A movie's (movielm_fast.plan.Movie) frames as storyboard cells."""
    return [(f.id, f.description, (f"{f.speaker}: " if f.speaker else "") + f"\u201c{f.dialogue}\u201d"
             if f.dialogue else "") for f in movie.frames]


def cell_lines(cell: Cell) -> list[str]:
    """The caption lines under a thumbnail: id and description (at most two lines), then the line said."""
    frame_id, description, said = cell
    head = textwrap.wrap(f"#{frame_id} {description}".strip(), width=34, max_lines=2, placeholder=" \u2026")
    return head + (textwrap.wrap(said, width=34, max_lines=CAPTION_LINES - len(head), placeholder=" \u2026")
                   if said else [])


class Storyboard:
    """A contact sheet (storyboard.png, or one page of a long movie's): under `title`, each frame's thumbnail with
    its caption (`cell_lines`) underneath, in plan order, `columns` to a row.

    It is compressed one row of cells (a band) at a time, as soon as every frame of that band is there, on whichever
    writer thread brought the band's last frame: the movie's last frame leaves one band to encode, where encoding
    the whole sheet at the end of the movie held its finish back (bench/RESULTS.md, "Movie boundaries on the render
    thread") and kept every thumbnail in memory until then. Frames not rendered in this run (`pending` lists those
    that are) are read back from their files by `read`. Pillow encodes only whole images, so the PNG is put together
    here: each scanline with the Sub filter, one zlib stream at level 1, the same bytes whatever order the frames
    arrive in."""

    def __init__(self, frames: list[Cell], read: Callable[[str], Image.Image], pending: Iterable[str] = (),
                 columns: int = 4, thumb: int = THUMB, title: str = ""):
        self.frames, self.read, self.thumb = frames, read, thumb
        self.pending = set(pending)
        self.cols = max(1, min(columns, len(frames)))
        self.rows = (len(frames) + self.cols - 1) // self.cols
        self.cell_w, self.cell_h = thumb + 16, thumb + CAPTION_H + 16
        self.thumbs: dict[str, Image.Image] = {}
        self.band = 0  # the next band to encode
        self.deflate = zlib.compressobj(1)
        self.compressed: list[bytes] = []
        self.font = _font(14)
        self._lock = threading.Lock()  # guards thumbs and pending
        self._encoding = threading.Lock()  # one thread encodes at a time, bands in order
        self._png: bytes | None = None
        self.header = TITLE_H if title else 0
        if title:  # the first band of the file
            band = Image.new("RGB", (self.cols * self.cell_w, TITLE_H), "white")
            ImageDraw.Draw(band).text((8, 10), title, fill="black", font=_font(18))
            self._compress(band)

    def add(self, frame_id: str, thumb: Image.Image | None) -> None:
        """A frame of this run is there: its thumbnail, or None when it is to be read back from its file."""
        with self._lock:
            self.pending.discard(frame_id)
            if thumb is not None:
                self.thumbs[frame_id] = thumb
        # Encode every band now complete, unless another thread is at it: that one re-checks after each band.
        while self._ready(self.band) and self._encoding.acquire(blocking=False):
            try:
                while self._ready(self.band):
                    self._encode_band()
            finally:
                self._encoding.release()

    def png(self) -> bytes:
        """The finished file: encodes the bands still left, reading the frames not given from their files."""
        with self._encoding:
            if self._png is None:
                while self.band < self.rows:
                    self._encode_band()
                height = self.header + self.rows * self.cell_h
                ihdr = struct.pack(">IIBBBBB", self.cols * self.cell_w, height, 8, 2, 0, 0, 0)
                idat = b"".join(self.compressed) + self.deflate.flush()
                self._png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
                self.compressed.clear()
            return self._png

    def _ready(self, band: int) -> bool:
        with self._lock:
            return band < self.rows and not any(
                fid in self.pending for fid, *_ in self.frames[band * self.cols:(band + 1) * self.cols])

    def _encode_band(self) -> None:
        sheet = Image.new("RGB", (self.cols * self.cell_w, self.cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        for i, cell in enumerate(self.frames[self.band * self.cols:(self.band + 1) * self.cols]):
            with self._lock:
                im = self.thumbs.pop(cell[0], None)
            im = im if im is not None else self.read(cell[0])
            x = i * self.cell_w + 8
            sheet.paste(im, (x + (self.thumb - im.width) // 2, 8))
            for k, line in enumerate(cell_lines(cell)):
                draw.text((x, 8 + self.thumb + 4 + 18 * k), line, fill="black", font=self.font)
        self._compress(sheet)
        self.band += 1

    def _compress(self, sheet: Image.Image) -> None:
        """A band of the sheet into the PNG's zlib stream."""
        rows = np.asarray(sheet).reshape(sheet.height, -1)
        filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
        filtered[:, 0] = 1  # PNG filter type Sub: each byte minus the byte one pixel to its left, mod 256
        filtered[:, 1:4] = rows[:, :3]
        np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])
        self.compressed.append(self.deflate.compress(filtered.tobytes()))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def read_thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return thumbnail(im).copy()


def storyboard(frames: list[tuple[Cell, Path | Image.Image]], columns: int = 4, thumb: int = THUMB,
               title: str = "") -> bytes:
    """A whole contact sheet at once. frames: (cell, file or a thumbnail made from the frame's pixels)."""
    sources = {cell[0]: src for cell, src in frames}
    sheet = Storyboard([cell for cell, _ in frames], lambda fid: read_thumbnail(sources[fid]),
                       pending=[cell[0] for cell, src in frames if isinstance(src, Image.Image)], columns=columns,
                       thumb=thumb, title=title)
    for cell, src in frames:
        if isinstance(src, Image.Image):
            sheet.add(cell[0], src)
    return sheet.png()

class StoryboardPages:
    """A movie's storyboard in its output folder: storyboard.png, or for a movie of more than FRAMES_PER_PAGE
    frames, storyboard-001.png, storyboard-002.png, ... with their index storyboard.json. `frames`: the cells in
    plan order; `frame_path`: where a frame's file is, for those not rendered in this run; `title`: the movie's."""

    def __init__(self, folder: Path, frames: list[Cell], frame_path: Callable[[str], Path], pending: Iterable[str],
                 title: str = ""):
        self.dir, self.frame_path, self.title = folder, frame_path, title
        self.pages = [frames[i:i + FRAMES_PER_PAGE] for i in range(0, len(frames), FRAMES_PER_PAGE)]
        self.page_of = {cell[0]: n for n, page in enumerate(self.pages) for cell in page}
        self.expect(pending)

    def expect(self, pending: Iterable[str]) -> None:
        """The frames this run renders: the pages wait for their thumbnails and read the others' files."""
        pending = set(pending)
        n = len(self.pages)
        self.sheets = [Storyboard(page, self._read_thumbnail, [cell[0] for cell in page if cell[0] in pending],
                                  title=self.title + (f" (page {k} of {n})" if n > 1 and self.title else ""))
                       for k, page in enumerate(self.pages, 1)]

    def _read_thumbnail(self, frame_id: str) -> Image.Image:
        """A frame's thumbnail from its file; a grey tile where the file cannot be read, so a damaged frame on
        disk never stops the storyboard of a movie (its manifest entry does not count it as done either)."""
        path = self.frame_path(frame_id)
        try:
            return read_thumbnail(path)
        except (OSError, ValueError, SyntaxError) as exc:
            log.warning("storyboard: cannot read %s (%s); a grey tile stands in for it", path, exc)
            return Image.new("RGB", (THUMB, THUMB), (128, 128, 128))

    def add(self, frame_id: str, thumb: Image.Image | None) -> None:
        """A frame of this run is written: its thumbnail (None: read it back from its file) for its page."""
        self.sheets[self.page_of[frame_id]].add(frame_id, thumb)

    @property
    def path(self) -> Path:
        """storyboard.png; for a paged storyboard, storyboard.json, the index of its pages."""
        return self.dir / ("storyboard.png" if len(self.pages) == 1 else "storyboard.json")

    def write(self) -> Path:
        """Write the storyboard (each page, and the index of a paged one); drop pages of an earlier, longer or
        shorter, version of the movie. Returns `path`."""
        if len(self.pages) == 1:
            atomic_write_bytes(self.dir / "storyboard.png", self.sheets[0].png())
            names = {"storyboard.png"}
        else:
            index = []
            for n, (page, sheet) in enumerate(zip(self.pages, self.sheets), 1):
                atomic_write_bytes(self.dir / f"storyboard-{n:03d}.png", sheet.png())
                index.append({"file": f"storyboard-{n:03d}.png", "first": page[0][0], "last": page[-1][0],
                              "frames": len(page)})
            atomic_write_text(self.dir / "storyboard.json",
                              json.dumps({"frames_per_page": FRAMES_PER_PAGE, "pages": index}, indent=1) + "\n")
            names = {p["file"] for p in index} | {"storyboard.json"}
        for stale in [*self.dir.glob("storyboard-[0-9][0-9][0-9].png"), self.dir / "storyboard.png",
                      self.dir / "storyboard.json"]:
            if stale.name not in names and stale.is_file():
                stale.unlink(missing_ok=True)
        self.expect(())  # a later call (the frames' dialogue changed) reads every file again
        return self.path
