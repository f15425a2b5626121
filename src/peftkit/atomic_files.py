"""Atomic file writes (a temp file in the same folder, then a rename): a reader never sees a
half-written file, and a crash leaves the previous version in place."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import Callable

# How a full disk (or an exhausted quota) shows: an OSError, or a library's own error that
# carries the OS message (safetensors raises SafetensorError("... No space left on device ...")).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(OSError):
    """A write failed for lack of disk space; the message says where, how much was needed and
    how much is free. Whatever was there before the write is still there."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in _DISK_FULL_TEXT)


def raise_if_disk_full(exc: BaseException, what: str, folder: str, needed_bytes: int | None, then: str = "") -> None:
    """Raise DiskFullError for `exc` when it is a full disk: `what` failed writing in `folder`
    and needed about `needed_bytes`; `then` says what is left and what to do. Else return."""
    if not is_disk_full(exc):
        return
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB are free there"
    except OSError:
        free = "the free space there is unknown"
    need = f"it needs about {needed_bytes / 2**20:.1f} MB and " if needed_bytes else ""
    error = DiskFullError(f"disk full while writing {what} in {folder}: {need}{free}" + (f"; {then}" if then else ""))
    error.errno = errno.ENOSPC
    raise error from None


def atomic_replace(path: str, write: Callable[[str], None], needed_bytes: int | None = None) -> None:
    """Create `path` by `write(temporary path)`, then rename it into place. A full disk raises
    DiskFullError (naming the file, `needed_bytes` if given, and the free space)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(exc, DiskFullError):
            name = os.path.basename(path)
            left = f"the previous {name} is unchanged" if os.path.exists(path) else f"no {name} was written"
            raise_if_disk_full(exc, name, directory, needed_bytes, left)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_replace(path, write)


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE), so a folder
    being replaced is never missing; False where the system cannot (the caller falls back)."""
    import ctypes

    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a kernel or file system without it
    raise OSError(code, os.strerror(code), str(b))
