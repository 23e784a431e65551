"""manifest.json: what a movie's output folder holds (its identity, model, settings, and an entry per frame with
the key it was rendered with), written atomically.

A movie's manifest is kept as manifest.json plus, while a run is adding frames, an append-only journal beside it
(manifest.journal.jsonl, one entry per written frame): appending is O(1) per frame where rewriting the whole
manifest after every batch would make long movies quadratic. `read_manifest` merges the two; a run rewrites
manifest.json and removes the journal when the movie completes and when the run ends. A frame is in the journal
only after its file is on disk, so a killed run (kill -9 included) loses at most the frames still being written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from movielm_fast.engine.seeds import SEED_SCHEME
from movielm_fast.paths import atomic_write_text, sha256_file

from .images import read_frame_metadata

if TYPE_CHECKING:
    from movielm_fast.plan import LoadedMovie

MANIFEST_FORMAT = "movielm-fast/manifest@1"
ENTRY_FIELDS = ("id", "file", "dialogue", "sha256", "seconds")  # a manifest entry = these + the frame's key


def journal_path(path: Path) -> Path:
    """The journal beside manifest.json `path`."""
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
        lines = journal_path(path).read_text(encoding="utf-8").splitlines()
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


def seed_scheme(path: Path, identity: str) -> int:
    """The seed scheme (engine.seeds) a movie renders with: the one its manifest records, so that a movie resumes
    with the noise it started with (1 for manifests from before schemes were recorded); the current one for a new
    movie, for another movie's folder (--replace) and where the manifest cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return SEED_SCHEME
    if not isinstance(data, dict) or data.get("identity", identity) != identity:
        return SEED_SCHEME
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    return settings.get("seed_scheme", 1)


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

