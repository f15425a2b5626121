"""Atomic file writes (a temp file in the same folder, then a rename): a reader never sees a
half-written file, and a crash leaves the previous version in place."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_replace(path: str, write: Callable[[str], None]) -> None:
    """Create `path` by `write(temporary path)`, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_replace(path, write)
