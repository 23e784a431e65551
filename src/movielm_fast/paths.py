"""Where files go and how they are written: the cache root and atomic writes.

A leaf module (standard library and `movielm_fast.errors` only), so `export/` and every engine module can use it
without import cycles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from movielm_fast.errors import UserError

CACHE_HINT = "set MOVIELM_CACHE to a writable folder (or unset it for ~/.cache/movielm-fast)"


def _home() -> Path:
    """The user's home folder. An empty HOME means unset (Path.home() would give "" -- the working directory);
    then the account's home from the password database."""
    home = os.environ.get("HOME", "").strip()
    if not home:
        try:
            import pwd

            home = pwd.getpwuid(os.getuid()).pw_dir
        except (ImportError, KeyError):
            home = ""
    if not home or Path(home) == Path("/"):
        raise UserError("no cache folder: MOVIELM_CACHE and HOME are both unset or empty",
                        "set MOVIELM_CACHE (or HOME) to a writable folder")
    return Path(home)


def cache_root() -> Path:
    """Everything movielm-fast caches (demo model, hash memo, styles, artifacts, LLM answers): $MOVIELM_CACHE,
    else ~/.cache/movielm-fast. An empty variable means unset: it must never make the working directory (or
    /.cache) the cache, which `export --clear` then cleans. Always absolute; never a file or a path under one."""
    env = os.environ.get("MOVIELM_CACHE", "").strip()
    root = (Path(env).expanduser() if env else _home() / ".cache" / "movielm-fast").absolute()
    for folder in (root, *root.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UserError(f"the cache folder {root} cannot be used: {folder} is not a folder", CACHE_HINT)
            break
    return root


def _write_hint(folder: Path) -> str:
    try:
        in_cache = Path(folder).absolute().is_relative_to(cache_root())
    except UserError:
        in_cache = False
    return CACHE_HINT if in_cache else "choose a writable folder with --out"


def make_dirs(folder: Path) -> Path:
    """mkdir -p, with an error that says which folder cannot be made and what to do (never a traceback)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder {folder}: {exc.strerror or exc}", _write_hint(folder)) from None
    return Path(folder)


_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where the OS can (Linux: /proc); elsewhere set and restored
    under a lock (the umask is per process, and writer threads create files concurrently)."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    with _umask_lock:
        old = os.umask(0o022)
        os.umask(old)
    return old


# mkstemp's names: our prefix ".<final name>.", 8 random characters, our suffix ".tmp".
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_TEMP_SECONDS = 15 * 60
"""A temporary file of ours older than this is an orphan (its writer was killed): a live writer fills and renames
one within seconds, so a concurrent render of the same folder never loses a file it is writing."""


def remove_stale_temporaries(folder: Path, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Delete orphaned temporary files of `atomic_write_bytes` in `folder` (not below it; symlinks left alone);
    returns how many went."""
    removed, cutoff = 0, time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False) \
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:  # gone already (another run cleaned it), or not ours to delete
            continue
    return removed


_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
          (stat.S_ISSOCK, "a socket"))  # a folder: the rename fails, and says so


def check_destination(path: Path) -> None:
    """A UserError when something other than a regular file is at `path`: the rename of an atomic write would
    replace it (a symlink would become a file and its target get nothing; /dev/full, a FIFO's reader, ...)."""
    try:
        st = os.lstat(path)
    except OSError:  # nothing there (or unreadable: the write itself says why)
        return
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}): movielm-fast writes a new file and "
                        "renames it into place, which would replace the link, so it does not write there",
                        "give the path the link points to, or remove the link")
    kind = next((name for test, name in _KINDS if test(st.st_mode)), None)
    if kind is not None:
        raise UserError(f"{path} is {kind}, not a regular file: movielm-fast writes a new file and renames it into "
                        "place, which would replace it, so it does not write there",
                        "give the path of a file (existing or new) instead")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see the old or the new file,
    never half of one. Only a regular file (or nothing) is replaced: `check_destination`."""
    path = Path(path)
    check_destination(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # permissions, a file in the way, a read-only filesystem, a name too long, ...
        raise UserError(f"cannot write to {path.parent}: {exc.strerror or exc}", _write_hint(path.parent)) from None
    try:
        with os.fdopen(fd, "wb") as fp:
            # mkstemp makes 0600 files; outputs (a dataset is shared) get the mode any other new file would.
            os.fchmod(fp.fileno(), 0o666 & ~umask())
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}",
                            "free some space and run the same command again; finished files are kept") from None
        if isinstance(exc, OSError):  # e.g. a folder where the file goes (frames/001.png/)
            raise UserError(f"cannot write {path}: {exc.strerror or exc}",
                            f"move or delete what is at {path}, or {_write_hint(path.parent)}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: list[Path]) -> list[str]:
    """The sha256 of each file, memoised in the cache (sha256-memo.json, one entry per path) under what neither a
    copy nor a rewrite in place can keep: device, inode, size, modification and change time. rsync -a, cp -p and
    tar restore the modification time; the change time is set by the kernel on every write, and nothing sets it
    back. Weights are gigabytes: re-hashing them on every run would cost seconds."""
    memo_path = cache_root() / "sha256-memo.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    digests, changed = [], False
    for f in files:
        real = Path(f).resolve()
        st = real.stat()  # before reading: a write while it is hashed changes the stamp, so the next call hashes again
        stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        entry = memo.get(str(real))
        if not (isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str)):
            entry = memo[str(real)] = {"stat": stamp, "sha256": sha256_file(real)}
            changed = True
        digests.append(entry["sha256"])
    if changed:
        try:
            atomic_write_text(memo_path, json.dumps(memo, indent=0))
        except UserError:
            pass  # the memo is an optimisation only
    return digests


@contextmanager
def atomic_dir(target: Path, marker: str) -> Iterator[Path | None]:
    """Build a folder under a temporary name and rename it to `target` on success, so a crash never leaves half
    of it. Yields None when `target/marker` already exists (nothing to build); another process that finished the
    same build first wins the rename."""
    target = Path(target)
    if (target / marker).exists():
        yield None
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 folders
    except OSError as exc:
        raise UserError(f"cannot create {target}: {exc.strerror or exc}", _write_hint(target.parent)) from None
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
