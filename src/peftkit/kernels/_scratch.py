"""Per-thread scratch buffers of the CPU kernels, reused between calls within a byte cap.

On CPU a fresh multi-MB tensor costs a page fault per 4 KiB page, and many short-lived MB-sized
buffers mixed with the model's own activations of the same sizes leave holes in glibc's heap
(peak RSS). The kernels that work in temporaries of their own (the dropout mask, the fp32 route
of 16-bit GEMMs) therefore take them from here. A slot is named "kernel/name"; a thread keeps one
buffer per slot while its kept buffers of that kernel fit in SCRATCH_CAP_BYTES (a budget per
kernel, so one kernel's large buffers do not evict another's); larger requests get a fresh
buffer, freed with its last use. A buffer is only in use within one call of its kernel.
"""
from __future__ import annotations

import mmap
import threading

import torch
from torch import Tensor

__all__ = ["SCRATCH_CAP_BYTES", "empty", "held", "keep", "scratch", "scratch_bytes_held"]

_THREAD_BUFFERS = threading.local()
# Most bytes of buffers a thread keeps between calls, per kernel. Reuse pays where page faults
# are a large share of a call (small and mid-sized inputs); larger buffers are fresh for each
# call, so a [4096, 2048] fp32 dropout call no longer leaves 64 MiB behind.
SCRATCH_CAP_BYTES = 8 << 20


def scratch(device, count: int, slot: str, dtype: torch.dtype = torch.int64) -> Tensor:
    """A [count] buffer to work in: this thread's buffer of the slot ("kernel/name", dtype,
    device), reused while the kernel's kept buffers fit in SCRATCH_CAP_BYTES, else a fresh one."""
    key = (torch.device(device), slot, dtype)
    buffer = held().get(key)
    if buffer is None or buffer.numel() < count:
        buffer = keep(key, empty(count, dtype, device))
    return buffer[:count]


_HUGE_PAGES = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux


def empty(count: int, dtype: torch.dtype, device) -> Tensor:
    """torch.empty, but a large CPU buffer is mapped with transparent huge pages where the OS
    offers them: a fresh 32 MiB buffer then costs ~5 ms of page faults instead of ~45 (4 KiB
    pages, measured on this project's machine), which is what keeps the buffers above
    SCRATCH_CAP_BYTES cheap to allocate per call. Unmapped when the tensor is freed. Never an
    inference tensor (one made under `torch.inference_mode` cannot be written outside it)."""
    nbytes = count * dtype.itemsize
    with torch.inference_mode(False):
        if _HUGE_PAGES is None or torch.device(device).type != "cpu" or nbytes < (2 << 20):
            return torch.empty(count, dtype=dtype, device=device)
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(_HUGE_PAGES)
        return torch.frombuffer(region, dtype=dtype, count=count)  # the tensor holds the mapping


def held() -> dict:
    """This thread's kept buffers, by (device, slot, dtype)."""
    return _THREAD_BUFFERS.__dict__.setdefault("held", {})


def keep(key: tuple, buffer: Tensor) -> Tensor:
    """Keep `buffer` as this thread's `key` (in place of the one there) if the kernel's kept
    buffers then fit in SCRATCH_CAP_BYTES; returns it either way. An inference tensor is never
    kept (it could not be written after `torch.inference_mode` ends)."""
    buffers = held()
    buffers.pop(key, None)
    if not buffer.is_inference() and buffer.nbytes + scratch_bytes_held(_kernel(key[1])) <= SCRATCH_CAP_BYTES:
        buffers[key] = buffer
    return buffer


def scratch_bytes_held(kernel: str | None = None) -> int:
    """Bytes of buffers this thread keeps between calls: of one kernel (at most
    SCRATCH_CAP_BYTES), or of all."""
    return sum(b.nbytes for (_, slot, _), b in held().items() if kernel is None or _kernel(slot) == kernel)


def _kernel(slot: str) -> str:
    return slot.split("/", 1)[0]
