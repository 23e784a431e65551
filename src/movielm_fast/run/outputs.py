"""One movie's output folder as a run fills it: its frames (run.images), anchors, manifest (run.manifest) and
storyboard (run.storyboard), every file written atomically; and whether the movie is complete."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_bytes, remove_stale_temporaries, sha256_file

from .images import IMAGE_FORMATS, png_bytes
from .manifest import (
    ENTRY_FIELDS,
    MANIFEST_FORMAT,
    DamagedManifest,
    journal_path,
    movie_identity,
    read_manifest,
    rebuilt_entry,
    write_manifest,
)
from .storyboard import StoryboardPages, cells

if TYPE_CHECKING:
    from movielm_fast.engine.jobs import AnchorSpec
    from movielm_fast.plan import LoadedMovie

    from .tasks import FrameTask, ModelInfo

log = logging.getLogger("movielm_fast")


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
        self.storyboard = StoryboardPages(self.dir, cells(lm.movie),
                                          lambda frame_id: self.dir / f"frames/{frame_id}{self.suffix}", self.pending,
                                          lm.movie.title or lm.movie.id)
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
                                   "steps": a.settings.steps, "key": a.key} for a in specs]

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
            for path in (self.manifest_path, journal_path(self.manifest_path)):
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
                # here, under the lock, serialised the writer threads.)
                with open(journal_path(self.manifest_path), "ab") as fp:
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
            journal_path(self.manifest_path).unlink(missing_ok=True)

    def complete(self) -> bool:
        """Every frame has an entry, and none is still to be rendered in this run (an entry of an earlier run with
        other settings is not this run's frame)."""
        with self._lock:
            return not self.pending and all(f.id in self.entries for f in self.lm.movie.frames)

    def expect(self, frame_ids: Iterable[str]) -> None:
        """The frames this run renders: the storyboard waits for their thumbnails and reads the others' files."""
        with self._lock:
            self.pending = set(frame_ids)
        self.storyboard.expect(self.pending)
