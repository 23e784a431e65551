"""Files a render produces: frames (PNG with text chunks, or JPEG/WebP with the same metadata as EXIF),
manifest.json, storyboard.png -- all written atomically.

A movie's manifest is kept as manifest.json plus, while a run is adding frames, an append-only journal beside it
(manifest.journal.jsonl, one entry per written frame): appending is O(1) per frame where rewriting the whole
manifest after every batch would make long movies quadratic. `read_manifest` merges the two; a run rewrites
manifest.json and removes the journal when the movie completes and when the run ends. A frame is in the journal
only after its file is on disk, so a killed run (kill -9 included) loses at most the frames still being written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
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
from movielm_fast.paths import atomic_write_bytes, atomic_write_text, remove_stale_temporaries, sha256_file

if TYPE_CHECKING:
    from movielm_fast.engine.jobs import AnchorSpec
    from movielm_fast.plan import LoadedMovie

    from .tasks import FrameTask, ModelInfo

MANIFEST_FORMAT = "movielm-fast/manifest@1"
IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = {"jpg": 95, "webp": 90}
ENTRY_FIELDS = ("id", "file", "dialogue", "sha256", "seconds")  # a manifest entry = these + the frame's key
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
EXIF_IFD, EXIF_USER_COMMENT = 0x8769, 0x9286
# Our scheduler names as A1111 names its samplers ("DPM++ 2M" is diffusers' dpmsolver++ multistep, order 2).
A1111_SAMPLERS = {"dpmpp": "DPM++ 2M", "dpmpp_sde": "DPM++ 2M SDE", "euler": "Euler", "euler_a": "Euler a",
                  "ddim": "DDIM", "unipc": "UniPC", "lcm": "LCM", "tcd": "TCD", "pndm": "PLMS"}

FRAMES_PER_PAGE = 256  # storyboard frames per file: 64 rows of 348 px, under image viewers' size limits

log = logging.getLogger("movielm_fast")


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


def frame_metadata(task: FrameTask, info: ModelInfo) -> dict[str, str]:
    """What a frame file carries so that it can be reproduced on its own: prompt, negative, seed, model, settings."""
    settings = {k: task.key[k] for k in ("width", "height", "steps", "guidance", "scheduler", "dtype")}
    settings.update({k: task.key[k] for k in LOSSY_KEYS if k in task.key})  # opt-in lossy speed-ups, when used
    return {"prompt": task.job.prompt, "negative_prompt": task.job.negative_prompt, "seed": str(task.job.seed),
            "model": info.model_id, "model_hash": info.content_hash, "settings": json.dumps(settings)}


def a1111_parameters(meta: dict[str, str]) -> str:
    """The frame's settings as A1111 writes them (its "parameters" text, which A1111's PNG Info, ComfyUI's and
    Civitai's readers parse): the prompt, "Negative prompt: ..." when there is one, then "Key: value, ..." pairs.
    No "Model hash": A1111's is a hash of the checkpoint file, which ours (of the whole model) is not."""
    s = json.loads(meta["settings"])
    sampler = A1111_SAMPLERS.get(s["scheduler"], s["scheduler"])
    pairs = {"Steps": s["steps"], "Sampler": sampler, "CFG scale": s["guidance"], "Seed": meta["seed"],
             "Size": f"{s['width']}x{s['height']}", "Model": meta["model"], "Version": "movielm-fast"}
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
    parameters = a1111_parameters(meta)
    if fmt == "png":
        return png_bytes(image, {**meta, "parameters": parameters})
    exif = Image.Exif()
    exif.endian = ">"  # big-endian, as A1111 (piexif) writes it: readers decode the UTF-16 comment in that order
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(meta)  # ASCII: json escapes everything else
    exif[EXIF_SOFTWARE] = "movielm-fast"
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return _saved(Image.fromarray(image), format="JPEG" if fmt == "jpg" else "WEBP", quality=quality, exif=exif)


def read_frame_metadata(path: Path) -> dict[str, str]:
    """The metadata `encode_image` stored in a frame file, whatever its format."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return {k: v for k, v in im.text.items() if k != "parameters"}
        return json.loads(im.getexif()[EXIF_IMAGE_DESCRIPTION])


def _journal(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + ".journal.jsonl")


class DamagedManifest(ValueError):
    """manifest.json (or its journal) is there but not a manifest this version can use: say why."""


def _entry_ok(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("file"), str) \
        and isinstance(entry.get("sha256", ""), str)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """manifest.json with the entries of its journal (frames written since it was last rewritten) merged in; None
    when there is none. Raises `DamagedManifest` for one that is there but unusable (not JSON, another format,
    mistyped fields)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DamagedManifest(f"cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DamagedManifest(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DamagedManifest(f"not a {MANIFEST_FORMAT} manifest")
    frames = data.get("frames", [])
    if not isinstance(frames, list) or not all(_entry_ok(e) for e in frames):
        raise DamagedManifest("'frames' is not a list of entries with a string id, file and sha256")
    try:
        lines = _journal(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return data
    except (OSError, ValueError) as exc:
        raise DamagedManifest(f"cannot read its journal ({exc})") from None
    entries = {e["id"]: e for e in frames}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: that frame is simply not done
        if not _entry_ok(entry):
            raise DamagedManifest(f"journal line {line[:80]!r} is not a frame entry")
        entries[entry["id"]] = entry
    return {**data, "frames": list(entries.values())}


def stored_identity(path: Path) -> dict[str, str] | None:
    """{'identity', 'title', 'plan'} of the movie a manifest belongs to; None where it says nothing (no manifest, a
    damaged one, or one written before movies had identities: adopted by the next render)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("identity"), str):
        return None
    movie = data.get("movie") if isinstance(data.get("movie"), dict) else {}
    return {"identity": data["identity"], "title": str(movie.get("title", "")), "plan": str(data.get("plan", ""))}


def movie_identity(lm: LoadedMovie) -> str:
    """Which movie an output folder belongs to: its id, title and plan file. Render settings, descriptions and
    dialogue are not part of it: changing them re-renders (or keeps) frames of the same movie."""
    payload = json.dumps([lm.movie.id, lm.movie.title, lm.source])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def rebuilt_entry(frame_id: str, file: str, path: Path, dialogue: str) -> dict[str, Any] | None:
    """A frame's manifest entry from its file alone (the key its embedded metadata gives), or None when the file
    is missing, unreadable or not one of ours."""
    try:
        meta = read_frame_metadata(path)
        with Image.open(path) as im:
            im.load()  # the whole file decodes: a truncated frame is not done
        key = {"prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"], "seed": int(meta["seed"]),
               **json.loads(meta["settings"]), "model_hash": meta["model_hash"]}
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return None
    return {"id": frame_id, "file": file, "dialogue": dialogue, **key, "sha256": sha256_file(path), "seconds": 0.0}


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
    if len(stem) > 64:  # file names have a length limit (255 bytes): a long name keeps its head and a digest
        stem = f"{stem[:48].rstrip('-.')}-{hashlib.sha256(character.encode()).hexdigest()[:12]}"
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
        for folder in (self.dir, self.dir / "frames", self.dir / "anchors"):
            remove_stale_temporaries(folder)  # left by a killed run
        self.entries: dict[str, dict[str, Any]] = {e["id"]: e for e in self._old_entries()}
        self.header = {"format": MANIFEST_FORMAT, "identity": movie_identity(lm), "plan": lm.source,
                       "movie": lm.movie.model_dump(mode="json"),
                       "model": {"id": info.model_id, "hash": info.content_hash, "kind": info.kind},
                       "settings": settings}
        self.pending: set[str] = {f.id for f in lm.movie.frames}  # frames this run renders, until `expect` says
        self.pages = [lm.movie.frames[i:i + FRAMES_PER_PAGE] for i in range(0, len(lm.movie.frames), FRAMES_PER_PAGE)]
        self.page_of = {f.id: n for n, page in enumerate(self.pages) for f in page}
        self.sheets = self._storyboards(self.pending)
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

    def _old_entries(self) -> list[dict[str, Any]]:
        """The entries of the manifest already there; a damaged one is kept beside it (.damaged) and its entries
        rebuilt from the frame files, whose metadata says what they are."""
        try:
            return (read_manifest(self.manifest_path) or {}).get("frames", [])
        except DamagedManifest as exc:
            for path in (self.manifest_path, _journal(self.manifest_path)):
                if path.is_file():
                    shutil.copyfile(path, path.with_name(path.name + ".damaged"))
            entries = [e for f in self.lm.movie.frames if (e := rebuilt_entry(
                f.id, f"frames/{f.id}{self.suffix}", self.dir / f"frames/{f.id}{self.suffix}", f.dialogue))]
            log.warning("%s is damaged (%s): kept a copy as %s.damaged; rebuilt %d frame entr%s from the frame "
                        "files", self.manifest_path, exc, self.manifest_path.name, len(entries),
                        "y" if len(entries) == 1 else "ies")
            return entries

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
            self.pending.discard(task.job.frame_id)

    def save(self) -> None:
        """Rewrite manifest.json in plan order (dropping frames no longer in the plan), then drop the journal."""
        with self._lock:
            order = [f.id for f in self.lm.movie.frames]
            frames = [self.entries[i] for i in order if i in self.entries]
            write_manifest(self.manifest_path, {**self.header, "frames": frames})
            _journal(self.manifest_path).unlink(missing_ok=True)

    def complete(self) -> bool:
        """Every frame has an entry, and none is still to be rendered in this run (an entry of an earlier run with
        other settings is not this run's frame)."""
        with self._lock:
            return not self.pending and all(f.id in self.entries for f in self.lm.movie.frames)

    def _storyboards(self, pending: Iterable[str]) -> list[Storyboard]:
        pending = set(pending)
        return [Storyboard([(f.id, f.dialogue) for f in page], self._read_thumbnail,
                           [f.id for f in page if f.id in pending]) for page in self.pages]

    def _read_thumbnail(self, frame_id: str) -> Image.Image:
        """A frame's thumbnail from its file; a grey tile where the file cannot be read, so a damaged frame on
        disk never stops the storyboard of a movie (its manifest entry does not count it as done either)."""
        path = self.dir / f"frames/{frame_id}{self.suffix}"
        try:
            return read_thumbnail(path)
        except (OSError, ValueError, SyntaxError) as exc:
            log.warning("storyboard: cannot read %s (%s); a grey tile stands in for it", path, exc)
            return Image.new("RGB", (THUMB, THUMB), (128, 128, 128))

    def expect(self, frame_ids: Iterable[str]) -> None:
        """The frames this run renders: the storyboard waits for their thumbnails and reads the others' files."""
        with self._lock:
            self.pending = set(frame_ids)
        self.sheets = self._storyboards(self.pending)

    def add_thumbnail(self, frame_id: str, thumb: Image.Image | None) -> None:
        """A frame of this run is written: its thumbnail (None: read it back from its file) for its page."""
        self.sheets[self.page_of[frame_id]].add(frame_id, thumb)

    @property
    def storyboard_path(self) -> Path:
        """storyboard.png; for a movie of more than FRAMES_PER_PAGE frames, storyboard.json, the index of its
        pages storyboard-001.png, storyboard-002.png, ..."""
        return self.dir / ("storyboard.png" if len(self.pages) == 1 else "storyboard.json")

    def write_storyboard(self) -> Path:
        """Write the storyboard (each page, and the index of a paged one); drop pages of an earlier, longer or
        shorter, version of the movie. Returns `storyboard_path`."""
        if len(self.pages) == 1:
            atomic_write_bytes(self.dir / "storyboard.png", self.sheets[0].png())
            names = {"storyboard.png"}
        else:
            index = []
            for n, (page, sheet) in enumerate(zip(self.pages, self.sheets), 1):
                atomic_write_bytes(self.dir / f"storyboard-{n:03d}.png", sheet.png())
                index.append({"file": f"storyboard-{n:03d}.png", "first": page[0].id, "last": page[-1].id,
                              "frames": len(page)})
            atomic_write_text(self.dir / "storyboard.json",
                              json.dumps({"frames_per_page": FRAMES_PER_PAGE, "pages": index}, indent=1) + "\n")
            names = {p["file"] for p in index} | {"storyboard.json"}
        for stale in [*self.dir.glob("storyboard-[0-9][0-9][0-9].png"), self.dir / "storyboard.png",
                      self.dir / "storyboard.json"]:
            if stale.name not in names and stale.is_file():
                stale.unlink(missing_ok=True)
        self.sheets = self._storyboards(())  # a later call (the frames' dialogue changed) reads every file again
        return self.storyboard_path
