"""The artifact cache: exported ONNX files and TensorRT engines, each in its own folder with a readable manifest.

Layout::

    <cache_root>/artifacts/<model id>-<model hash>/<component>.<target>.<dtype>.<profile id>.<key>/
        manifest.json        what, from which model, with which tools, shapes covered, files and sizes
        model.onnx (+ model.onnx.data) | engine.plan

The key is a digest of the model's content hash, component, target, dtype, profile and the exporter/runtime
versions, so upgrading onnxruntime or TensorRT never serves a stale artifact. An entry is written into a
temporary folder and renamed into place; a folder without a complete manifest (a crash mid-export) is never a hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

from movielm_fast.errors import UserError
from movielm_fast.paths import cache_root, make_dirs, sha256_files, umask

log = logging.getLogger("movielm_fast")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "movielm-fast-artifact/1"
EXPORTER_VERSION = "1"  # bump whenever the graphs export/graphs.py and export/onnx_export.py write change


def artifacts_root() -> Path:
    return cache_root() / "artifacts"


def tool_versions(target: str) -> dict[str, str]:
    """Versions of everything that shapes the artifact's bytes (part of the key)."""
    # From package metadata, not imports: importing diffusers takes seconds, and `export --list` needs none of it.
    versions = {"exporter": EXPORTER_VERSION, "torch": version("torch").split("+")[0],
                "diffusers": version("diffusers"), "transformers": version("transformers")}
    # onnx, onnxruntime and tensorrt are optional dependencies: imported only for the targets that need them.
    try:
        import onnx

        versions["onnx"] = onnx.__version__
    except ImportError:
        pass
    if target.startswith("ort"):
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    if target.startswith("trt"):
        import tensorrt  # callers checked it is installed (export.tensorrt.require_tensorrt)

        versions["tensorrt"] = tensorrt.__version__
    return versions


@dataclass(frozen=True)
class ArtifactKey:
    model_id: str
    model_hash: str
    component: str
    target: str  # "ort-cpu" | "ort-cuda" | "trt-onnx" | "trt-engine-<gpu>"
    dtype: str  # "fp32" | "fp16"
    profile_id: str  # "dynamic" for ONNX files with fully dynamic axes
    versions: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        payload = json.dumps([self.model_hash, self.component, self.target, self.dtype, self.profile_id,
                              list(self.versions)])
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        return f"{self.component}.{self.target}.{self.dtype}.{self.profile_id}.{self.digest}"

    @property
    def model_folder(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_id)[:40] or "model"
        return f"{safe}-{self.model_hash}"

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_hash": self.model_hash, "component": self.component,
                "target": self.target, "dtype": self.dtype, "profile": self.profile_id,
                "versions": dict(self.versions), "key": self.digest}


def make_key(model, component: str, target: str, dtype: str, profile_id: str = "dynamic") -> ArtifactKey:
    versions = tool_versions(target)
    return ArtifactKey(model.model_id, model.content_hash, component, target, dtype, profile_id,
                       tuple(sorted(versions.items())))


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    def file(self, name: str | None = None) -> Path:
        return self.path / (name or self.manifest["main_file"])

    @property
    def component(self) -> str:
        return self.manifest["component"]

    def check_model(self, model) -> None:
        """An artifact exported from another model must never run silently with this one's tokenizer/config."""
        theirs = self.manifest.get("model_hash")
        if theirs != model.content_hash:
            raise UserError(
                f"artifact {self.path} was exported from model {self.manifest.get('model_id')!r} (hash {theirs}), "
                f"not from {model.model_id!r} (hash {model.content_hash})",
                "re-export for this model: movielm-fast export --model <the model you render with>; "
                "or clear stale artifacts with movielm-fast export --clear")


def _complete(folder: Path) -> dict[str, Any] | None:
    """The manifest if `folder` is a complete entry: manifest readable, every listed file present with its size and
    sha256 (memoised: paths.sha256_files; a file damaged without changing its size is not used). Entries from
    before sha256 was recorded are not complete: they are exported again."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not manifest.get("complete"):
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    for name, info in files.items():
        f = folder / name
        if not (isinstance(info, dict) and f.is_file() and f.stat().st_size == info.get("bytes")
                and sha256_files([f])[0] == info.get("sha256")):
            return None
    return manifest


def entry_path(key: ArtifactKey, root: Path | None = None) -> Path:
    return (root or artifacts_root()) / key.model_folder / key.folder_name


def lookup(key: ArtifactKey, root: Path | None = None) -> Artifact | None:
    folder = entry_path(key, root)
    manifest = _complete(folder)
    if manifest is None:
        return None
    log.info("artifact cache hit: %s", folder)
    return Artifact(folder, manifest)


@contextmanager
def writing(key: ArtifactKey, root: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder to write the entry into; on success it is renamed into place atomically.

    The body must write the files; `commit` below adds the manifest. An exception leaves nothing behind.
    """
    final = entry_path(key, root)
    make_dirs(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key.folder_name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 folders; a shared cache keeps the umask's mode
    try:
        yield tmp
        if _complete(tmp) is None:
            raise RuntimeError(f"internal error: {tmp} was not committed with a complete manifest")
        if final.exists():
            if _complete(final) is not None:  # another process finished the same export first: keep theirs
                return
            shutil.rmtree(final)  # a broken leftover
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit(folder: Path, key: ArtifactKey, main_file: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest (last, so its presence means every file is complete)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_files([p])[0]} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "complete": True, **key.as_dict(), "main_file": main_file,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
                "total_bytes": sum(f["bytes"] for f in files.values()), **extra}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def list_entries(root: Path | None = None) -> list[Artifact]:
    root = root or artifacts_root()
    out = []
    for folder in sorted(root.glob("*/*")) if root.exists() else []:
        if folder.is_dir() and not folder.name.startswith(".tmp-"):
            manifest = _complete(folder)
            if manifest is not None:
                out.append(Artifact(folder, manifest))
    return out


TIMING_CACHE = re.compile(r"^trt-timing-[A-Za-z0-9._-]+\.cache$")  # export.tensorrt.timing_cache_path


def _ours(folder: Path, model_hash: str | None) -> bool:
    """An entry this cache made (its manifest says so; complete or not), of `model_hash` when given."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT \
        and (model_hash is None or manifest.get("model_hash") == model_hash)


def clear(root: Path | None = None, model_hash: str | None = None) -> int:
    """Remove every entry (or only one model's); returns how many went. Only what this cache made goes: folders
    whose manifest says they are ours, and TensorRT timing caches by their name; anything else found there (a
    folder of the user's, were the cache root ever pointed at one) is left alone."""
    root = root or artifacts_root()
    removed = 0
    for model_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if model_dir.is_symlink() or not model_dir.is_dir():
            continue
        for entry in sorted(model_dir.iterdir()):
            if not entry.is_symlink() and entry.is_dir() and _ours(entry, model_hash):
                shutil.rmtree(entry)
                removed += 1
        try:
            model_dir.rmdir()  # only when nothing else is left in it
        except OSError:
            pass
    for stray in root.iterdir() if root.is_dir() and not model_hash else []:
        if TIMING_CACHE.match(stray.name) and stray.is_file() and not stray.is_symlink():
            stray.unlink()
    return removed


UNFINISHED_SECONDS = 3600
"""An export's temporary folder unchanged for this long is a killed run's: a live export writes into it (or renames it
into place) well within that; --clear removes such folders, never younger ones."""


def unfinished(root: Path | None = None, model_hash: str | None = None) -> list[tuple[Path, int, float]]:
    """The temporary folders of exports that never finished (`writing`'s, left by a killed process), of `model_hash`
    when given: (folder, bytes, seconds since anything in it changed)."""
    root = root or artifacts_root()
    out = []
    for folder in sorted(root.glob("*/.tmp-*")) if root.is_dir() else []:
        if folder.is_symlink() or not folder.is_dir() or (model_hash and not folder.parent.name.endswith(model_hash)):
            continue
        files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
        newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in files)])
        out.append((folder, sum(p.stat().st_size for p in files), time.time() - newest))
    return out


def clear_unfinished(root: Path | None = None, model_hash: str | None = None) -> tuple[int, int]:
    """Remove the unfinished exports' folders older than UNFINISHED_SECONDS; (removed, kept as maybe in progress)."""
    removed = kept = 0
    for folder, _, age in unfinished(root, model_hash):
        if age < UNFINISHED_SECONDS:
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
        try:
            folder.parent.rmdir()  # only when nothing else is left in it
        except OSError:
            pass
    return removed, kept


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
