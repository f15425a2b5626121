"""One run per output folder: `output_dir/.peftkit-run.lock`, held for the whole run.

Two runs writing one folder would interleave their checkpoints and metrics.jsonl and
overwrite each other's adapter. The lock is an exclusive `flock` on the file, which the
kernel drops when its process dies, so a SIGKILLed run never blocks the next one; the file
also names its owner (pid, host, start time) for the error message. A file still naming an
owner when its flock is free was left by a process that died: on this host that is checked
(the pid no longer runs, or now belongs to another program) and the lock is taken over with
a warning; a lock left by another host is refused, with the file to delete, because that
process cannot be checked from here.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".peftkit-run.lock"

_held: dict[str, list] = {}  # real path -> [fd, depth]: a process may re-enter its own lock


class OutputDirInUse(OSError):
    """Another run holds the output folder; the message names it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.EBUSY


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike, is_main_process: bool = True) -> Iterator[None]:
    """Own `output_dir` for the duration of the block (the main process takes the lock; other
    processes of the same run share it). Raises OutputDirInUse when another run owns it."""
    if not is_main_process:
        yield
        return
    path = acquire(output_dir)
    try:
        yield
    finally:
        release(path)


def acquire(output_dir: str | os.PathLike) -> str:
    """Take the lock of `output_dir` (created if missing); returns the lock's path for `release`."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(root / LOCK_FILE)
    if path in _held:
        _held[path][1] += 1
        return path
    for _ in range(10):  # a lock file replaced between open and flock: try the new one
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_owner(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirInUse(f"output_dir {str(root)!r} is in use by another peftkit run "
                                 f"({_describe(owner)}); wait for it to finish or choose another output_dir") from None
        if os.fstat(fd).st_ino != _inode(path):
            os.close(fd)  # the previous owner deleted the file as we opened it
            continue
        try:
            owner = _read_owner(fd)
            if owner:
                _take_over(fd, owner, root, path)
            _write_owner(fd)
        except BaseException:  # e.g. disk full writing the owner: give the lock up, or a retry finds it held
            os.close(fd)
            raise
        _held[path] = [fd, 1]
        return path
    raise OutputDirInUse(f"could not lock {path}: it keeps being replaced by another process")


def release(path: str) -> None:
    """Give up a lock taken by `acquire` (the outermost release deletes the file)."""
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[path]
    fd = entry[0]
    with contextlib.suppress(FileNotFoundError):
        if os.fstat(fd).st_ino == _inode(path):
            os.unlink(path)  # while still locked: nobody can take a file that is about to go
    os.close(fd)


def _take_over(fd: int, owner: dict, root: Path, path: str) -> None:
    """The flock is free but the file names an owner: it died without cleaning up (taken over),
    or it lives elsewhere (refused; the caller closes `fd`)."""
    host, pid = owner.get("host"), owner.get("pid")
    if host != socket.gethostname():
        raise OutputDirInUse(f"output_dir {str(root)!r} holds a lock of another host ({_describe(owner)}); "
                             f"if that run is over, delete {path} and start again")
    if isinstance(pid, int) and _same_process_running(pid, owner.get("proc_start")):
        # alive, yet its flock is free: a file system without locks; trust the file (the caller closes fd)
        raise OutputDirInUse(f"output_dir {str(root)!r} is in use by another peftkit run "
                             f"({_describe(owner)}); wait for it to finish or choose another output_dir")
    warnings.warn(f"taking over the lock of {root}: its owner ({_describe(owner)}) is no longer running", stacklevel=4)


def _write_owner(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}
    return owner if isinstance(owner, dict) else {"unreadable": True}


def _describe(owner: dict) -> str:
    if not owner or owner.get("unreadable"):
        return "owner unknown"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _same_process_running(pid: int, proc_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False  # exited, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start
