"""Where files go and how they are written: the cache root and atomic writes.

A leaf module (standard library and `movielm_fast.errors` only), so `export/` and every engine module can use it
without import cycles.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from movielm_fast.errors import UserError


def cache_root() -> Path:
    """Everything movielm-fast caches (demo model, hash memo, styles, artifacts, LLM answers): $MOVIELM_CACHE,
    else ~/.cache/movielm-fast."""
    return Path(os.environ.get("MOVIELM_CACHE", Path.home() / ".cache" / "movielm-fast"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see the old or the new file,
    never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # permissions, a file in the way, a read-only filesystem, a name too long, ...
        raise UserError(f"cannot write to {path.parent}: {exc.strerror or exc}",
                        "choose a writable folder with --out") from None
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}",
                            "free some space and run the same command again; finished files are kept") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(target: Path, marker: str) -> Iterator[Path | None]:
    """Build a folder under a temporary name and rename it to `target` on success, so a crash never leaves half
    of it. Yields None when `target/marker` already exists (nothing to build); another process that finished the
    same build first wins the rename."""
    target = Path(target)
    if (target / marker).exists():
        yield None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(built: Path, dest: Path) -> None:
    """Put the finished folder `built` where `dest` is, replacing it: renames only, so `dest` is the old folder or
    the new one, never a mix (between the two renames a reader finds nothing and retries, as after a crash)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    built.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
