"""Files a render produces: frames (PNG with text chunks, or JPEG/WebP with the same metadata as EXIF),
manifest.json, storyboard.png -- all written atomically.

A movie's manifest is kept as manifest.json plus, while a run is adding frames, an append-only journal beside it
(manifest.journal.jsonl, one entry per written frame): appending is O(1) per frame where rewriting the whole
manifest after every batch would make long movies quadratic. `read_manifest` merges the two; a run rewrites
manifest.json and removes the journal when the movie completes and when the run ends. A frame is in the journal
only after its file is on disk, so a killed run (kill -9 included) loses at most the frames still being written.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import textwrap
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_bytes, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from .consistency import AnchorSpec
    from .plan import LoadedMovie
    from .renderer import FrameTask, ModelInfo

MANIFEST_FORMAT = "movielm-fast/manifest@1"
IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = {"jpg": 95, "webp": 90}
ENTRY_FIELDS = ("id", "file", "dialogue", "sha256", "seconds")  # a manifest entry = these + the frame's key
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131


def _saved(im: Image.Image, format: str, **save_args: Any) -> bytes:
    """The file Pillow writes for `im`, as bytes. Pillow's JPEG encoder holds the GIL while it writes into a
    BytesIO, but not while it writes to a file descriptor: on the writer threads a BytesIO stalled the render
    loop beside them 20- to 35-fold (measured), so where the OS has anonymous in-memory files a JPEG is encoded into
    one and read back (the same bytes). PNG (zlib) and WebP release the GIL either way, and the detour would only
    cost them time."""
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


def frame_metadata(task: FrameTask, info: ModelInfo) -> dict[str, str]:
    """What a frame file carries so that it can be reproduced on its own: prompt, negative, seed, model, settings."""
    settings = {k: task.key[k] for k in ("width", "height", "steps", "guidance", "scheduler", "dtype")}
    settings.update({k: task.key[k] for k in LOSSY_KEYS if k in task.key})  # opt-in lossy speed-ups, when used
    return {"prompt": task.job.prompt, "negative_prompt": task.job.negative_prompt, "seed": str(task.job.seed),
            "model": info.model_id, "model_hash": info.content_hash, "settings": json.dumps(settings)}


def encode_image(image: np.ndarray, task: FrameTask, info: ModelInfo, fmt: str = "png",
                 quality: int | None = None) -> bytes:
    """One frame's file: PNG with iTXt chunks, or JPEG/WebP with the same metadata as JSON in EXIF
    ImageDescription (readable with any EXIF tool). `quality`: as `resolve_quality` gave it, once per job."""
    meta = frame_metadata(task, info)
    if fmt == "png":
        return png_bytes(image, meta)
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(meta)  # ASCII: json escapes everything else
    exif[EXIF_SOFTWARE] = "movielm-fast"
    return _saved(Image.fromarray(image), format="JPEG" if fmt == "jpg" else "WEBP", quality=quality, exif=exif)


def read_frame_metadata(path: Path) -> dict[str, str]:
    """The metadata `encode_image` stored in a frame file, whatever its format."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return dict(im.text)
        return json.loads(im.getexif()[EXIF_IMAGE_DESCRIPTION])


def _journal(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".journal.jsonl")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """manifest.json with the entries of its journal (frames written since it was last rewritten) merged in."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: frames are checked against their files anyway
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    try:
        lines = _journal(path).read_text().splitlines()
    except OSError:
        return data
    entries = {e["id"]: e for e in data.get("frames", []) if "id" in e}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: that frame is simply not done
        if isinstance(entry, dict) and "id" in entry:
            entries[entry["id"]] = entry
    return {**data, "frames": list(entries.values())}


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


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
    # reducing_gap=1: an integer factor (512 -> 256) is a box-filter reduce, 3.5x cheaper than Pillow's default
    # bicubic pass over the full frame; any remainder is still resampled bicubically.
    im.thumbnail((THUMB, THUMB), reducing_gap=1.0)
    return im


CAPTION_H = 4 + 18 * 4  # id and up to three lines of dialogue under each thumbnail


class Storyboard:
    """A movie's contact sheet (storyboard.png): each frame's thumbnail with its id and dialogue underneath, in plan
    order, `columns` to a row.

    It is compressed one row of cells (a band) at a time, as soon as every frame of that band is there, on whichever
    writer thread brought the band's last frame: the movie's last frame leaves one band to encode, where encoding
    the whole sheet at the end of the movie held its finish back (0.4 s for 64 frames at 512^2) and kept every
    thumbnail in memory until then. Frames not rendered in this run (`pending` lists those that are) are read back
    from their files by `read`. Pillow encodes only whole images, so the PNG is put together here: each scanline
    with the Sub filter, one zlib stream at level 1, the same bytes whatever order the frames arrive in."""

    def __init__(self, frames: list[tuple[str, str]], read: Callable[[str], Image.Image],
                 pending: Iterable[str] = (), columns: int = 4, thumb: int = THUMB):
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
                ihdr = struct.pack(">IIBBBBB", self.cols * self.cell_w, self.rows * self.cell_h, 8, 2, 0, 0, 0)
                idat = b"".join(self.compressed) + self.deflate.flush()
                self._png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
                self.compressed.clear()
            return self._png

    def _ready(self, band: int) -> bool:
        with self._lock:
            return band < self.rows and not any(
                fid in self.pending for fid, _ in self.frames[band * self.cols:(band + 1) * self.cols])

    def _encode_band(self) -> None:
        sheet = Image.new("RGB", (self.cols * self.cell_w, self.cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (frame_id, dialogue) in enumerate(self.frames[self.band * self.cols:(self.band + 1) * self.cols]):
            with self._lock:
                im = self.thumbs.pop(frame_id, None)
            im = im if im is not None else self.read(frame_id)
            x = i * self.cell_w + 8
            sheet.paste(im, (x + (self.thumb - im.width) // 2, 8))
            lines = [f"#{frame_id}"] + (textwrap.wrap(f"\u201c{dialogue}\u201d", width=34)[:3] if dialogue else [])
            for k, line in enumerate(lines):
                draw.text((x, 8 + self.thumb + 4 + 18 * k), line, fill="black", font=self.font)
        rows = np.asarray(sheet).reshape(self.cell_h, -1)
        filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
        filtered[:, 0] = 1  # PNG filter type Sub: each byte minus the byte one pixel to its left, mod 256
        filtered[:, 1:4] = rows[:, :3]
        np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])
        self.compressed.append(self.deflate.compress(filtered.tobytes()))
        self.band += 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def read_thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return thumbnail(im).copy()


def storyboard(frames: list[tuple[str, str, Path | Image.Image]], columns: int = 4, thumb: int = THUMB) -> bytes:
    """A whole contact sheet at once. frames: (id, dialogue, file or a thumbnail made from the frame's pixels)."""
    sources = {fid: src for fid, _, src in frames}
    sheet = Storyboard([(fid, dialogue) for fid, dialogue, _ in frames], lambda fid: read_thumbnail(sources[fid]),
                       pending=[fid for fid, _, src in frames if isinstance(src, Image.Image)], columns=columns,
                       thumb=thumb)
    for fid, _, src in frames:
        if isinstance(src, Image.Image):
            sheet.add(fid, src)
    return sheet.png()


def anchor_file(character: str, taken: set[str]) -> str:
    """A safe file name for a character's anchor image (names are free text; distinct names stay distinct)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", character).strip("-.") or "character"
    name, k = stem, 2
    while name.lower() in taken:
        name, k = f"{stem}-{k}", k + 1
    taken.add(name.lower())
    return f"anchors/{name}.png"


class MovieOutputs:
    """Output folder and manifest of one movie. Thread-safe: writer threads record frames concurrently."""

    def __init__(self, out: Path, lm: LoadedMovie, info: ModelInfo, settings: dict[str, Any], image_format: str):
        self.lm = lm
        self.suffix = IMAGE_FORMATS[image_format]
        self.dir = Path(out) / lm.movie.id
        self.manifest_path = self.dir / "manifest.json"
        old = read_manifest(self.manifest_path) or {}
        self.entries: dict[str, dict[str, Any]] = {e["id"]: e for e in old.get("frames", []) if "id" in e}
        self.header = {"format": MANIFEST_FORMAT, "movie": lm.movie.model_dump(mode="json"),
                       "model": {"id": info.model_id, "hash": info.content_hash, "kind": info.kind},
                       "settings": settings}
        self.sheet = self._storyboard(pending=[f.id for f in lm.movie.frames])  # until `expect` says which
        self.anchor_specs: list[AnchorSpec] = []
        self.anchor_files: dict[str, str] = {}
        self._lock = threading.Lock()

    def set_anchors(self, specs: list[AnchorSpec]) -> None:
        """The character anchors its frames use (consistency mode): listed in the manifest, files named here."""
        taken: set[str] = set()
        self.anchor_specs = specs
        self.anchor_files = {a.character: anchor_file(a.character, taken) for a in specs}
        self.header["anchors"] = [{"character": a.character, "file": self.anchor_files[a.character],
                                   "prompt": a.prompt, "negative_prompt": a.negative_prompt, "seed": a.seed,
                                   "key": a.key} for a in specs]

    def anchor_saved(self, spec: AnchorSpec) -> bool:
        """Whether this exact anchor's image is on disk already (from this run or an earlier one)."""
        try:
            with Image.open(self.dir / self.anchor_files[spec.character]) as im:
                return im.text.get("anchor_key") == spec.key
        except (OSError, ValueError):
            return False  # missing or unreadable

    def write_anchor(self, spec: AnchorSpec, image: np.ndarray) -> None:
        atomic_write_bytes(self.dir / self.anchor_files[spec.character], png_bytes(image, {
            "anchor_key": spec.key, "character": spec.character, "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt, "seed": str(spec.seed)}))

    def is_done(self, task: FrameTask) -> bool:
        """Its entry was made with exactly this key (nothing missing, nothing extra) and its file is intact."""
        entry = self.entries.get(task.job.frame_id)
        if not entry or {k: v for k, v in entry.items() if k not in ENTRY_FIELDS} != task.key:
            return False
        path = self.dir / entry["file"]
        return path.suffix == self.suffix and path.is_file() and sha256_file(path) == entry.get("sha256")

    def frame_file(self, task: FrameTask) -> str:
        return f"frames/{task.job.frame_id}{self.suffix}"

    def record(self, task: FrameTask, sha256: str, seconds: float) -> None:
        """The manifest entry of a frame whose file is already on disk (a journal line; manifest.json is
        rewritten by `save`)."""
        entry = {"id": task.job.frame_id, "file": self.frame_file(task), "dialogue": task.dialogue, **task.key,
                 "sha256": sha256, "seconds": round(seconds, 4)}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                # No fsync: a kill -9 keeps what was written (the page cache survives the process), and a line lost
                # to a power cut only re-renders a frame whose file is already there; a cut line is ignored on
                # reading. The frame file itself was fsynced first, so a line never outlives its file. (An fsync
                # here, under the lock, serialised the writer threads: ~1 ms per frame.)
                with open(_journal(self.manifest_path), "ab") as fp:
                    fp.write(line)
            except OSError as exc:
                raise UserError(f"cannot write {self.manifest_path}: {exc.strerror or exc}",
                                "free some space (or fix permissions) and run the same command again; "
                                "finished frames are kept") from None
            self.entries[task.job.frame_id] = entry

    def save(self) -> None:
        """Rewrite manifest.json in plan order (dropping frames no longer in the plan), then drop the journal."""
        with self._lock:
            order = [f.id for f in self.lm.movie.frames]
            frames = [self.entries[i] for i in order if i in self.entries]
            write_manifest(self.manifest_path, {**self.header, "frames": frames})
            _journal(self.manifest_path).unlink(missing_ok=True)

    def complete(self) -> bool:
        return all(f.id in self.entries for f in self.lm.movie.frames)

    def _storyboard(self, pending: Iterable[str]) -> Storyboard:
        return Storyboard([(f.id, f.dialogue) for f in self.lm.movie.frames],
                          lambda fid: read_thumbnail(self.dir / f"frames/{fid}{self.suffix}"), pending)

    def expect(self, frame_ids: Iterable[str]) -> None:
        """The frames this run renders: the storyboard waits for their thumbnails and reads the others' files."""
        self.sheet = self._storyboard(frame_ids)

    def write_storyboard(self) -> Path:
        path = self.dir / "storyboard.png"
        atomic_write_bytes(path, self.sheet.png())
        self.sheet = self._storyboard(())  # a later call (the frames' dialogue changed) reads every file again
        return path
