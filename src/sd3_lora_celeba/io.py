"""Atomic file writes and output locks.

Every output is written to a temporary file in the same folder, then renamed: a crash or kill at any point
leaves either the old file or the new one, never a half-written file. Temporary files start with ``.tmp-`` so
that readers and resumable loops ignore them. Outputs get the permissions an ordinary ``open()`` would give
(``0666 & ~umask``), so a colleague or a job running as another user can read them.

:func:`output_lock` keeps two processes out of one output folder: a lock file holding the holder's pid and
host, created atomically, and taken over only when its holder is provably gone (same host, dead pid).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sd3_lora_celeba.errors import InputError

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".sd3.lock"
# Most file systems allow 255 bytes per name; the temporary name adds the prefix and a random part.
_MAX_NAME_BYTES = 255


def current_umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_stem(name: str) -> str:
    """``.tmp-<name>.`` or, for names too long to extend, a short stand-in made from the name's hash."""
    stem = TMP_PREFIX + name + "."
    if len(stem.encode("utf-8")) + 16 > _MAX_NAME_BYTES:
        stem = TMP_PREFIX + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16] + "."
    return stem


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if len(path.suffix) <= 16 else ""
    fd, tmp = tempfile.mkstemp(prefix=_temp_stem(path.name), suffix=suffix, dir=path.parent)
    # mkstemp creates 0600 whatever the umask; give the file what open() would.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_copy(src: Path | str, dst: Path | str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_save_safetensors(path: Path | str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors with safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def remove_stale_temp_files(folder: Path | str, recursive: bool = True) -> int:
    """Delete ``.tmp-*`` files left by an interrupted run in (or below) ``folder``; return how many."""
    n = 0
    folder = Path(folder)
    for p in folder.rglob(TMP_PREFIX + "*") if recursive else folder.glob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


class LockedError(InputError):
    """Another live process holds the lock of an output folder (one line, exit 2)."""


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_alive(info: dict[str, Any]) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot tell for another host: assume it is alive
    pid = info.get("pid")
    return isinstance(pid, int) and pid > 0 and process_alive(pid)


@contextlib.contextmanager
def output_lock(folder: Path | str, what: str) -> Iterator[Path]:
    """Hold ``folder/.sd3.lock`` for the block: one process per output folder.

    Raises :class:`LockedError` naming the holder (pid, host, command) when another live process has it. A lock
    left by a process that died on this host is taken over. Re-entrant within one process.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
        except FileExistsError:
            try:
                info = json.loads(lock.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                info = {}
            if info.get("pid") == me["pid"] and info.get("host") == me["host"]:
                yield lock  # already ours (a stage called from another stage)
                return
            if info and _holder_alive(info):
                raise LockedError(
                    f"{folder}: in use by {info.get('what', 'another run')} (pid {info.get('pid')} on "
                    f"{info.get('host')}); wait for it to finish, or delete {lock} if that process is gone"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its holder died
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        try:
            yield lock
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        return
    raise LockedError(f"{folder}: could not take {lock}; delete it if no other run is using this folder")


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """sha256 of a file, memoised per (path, size, mtime): large weights are hashed once per process."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
