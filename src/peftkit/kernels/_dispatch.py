"""The fast-path switch and the per-op, per-device kernel registry.

Every public op in `peftkit.kernels` routes through `select()`: with fast paths disabled it
runs the plain reference implementation; otherwise a kernel registered for the tensor's device
type (e.g. a Triton kernel for "cuda") wins over the portable torch implementation. The switch
is process-global (not thread-local) and is read at call time, so flipping it takes effect on
the next call; torch.compile guards on it and recompiles if it changes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

OPS = ("lora_linear", "linear_cross_entropy", "dora_weight_norm", "attention")

_FALSE_WORDS = {"0", "false", "no", "off"}
_TRUE_WORDS = {"1", "true", "yes", "on", ""}


def env_switch(name: str) -> bool:
    """The on/off environment variable `name`: 1/true/yes/on (or unset, or empty) or 0/false/no/off."""
    raw = os.environ.get(name, "1").strip().lower()
    if raw in _FALSE_WORDS:
        return False
    if raw in _TRUE_WORDS:
        return True
    raise ValueError(
        f"{name}={raw!r} is not understood; use one of "
        f"{sorted(_TRUE_WORDS - {''})} or {sorted(_FALSE_WORDS)}"
    )


def _initial_state() -> bool:
    # PEFTKIT_FAST_PATHS=0 selects the reference paths for a whole run without code changes.
    return env_switch("PEFTKIT_FAST_PATHS")


_enabled: bool = _initial_state()
_kernels: dict[tuple[str, str], Callable] = {}


def set_fast_paths(enabled: bool) -> None:
    """Select the fast kernels (True, the default) or the plain reference paths (False)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_paths expects a bool, got {enabled!r}")
    _enabled = enabled


def fast_paths_enabled() -> bool:
    """Whether the ops in `peftkit.kernels` currently use their fast implementations."""
    return _enabled


@contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Context manager form of `set_fast_paths`; restores the previous setting on exit."""
    previous = _enabled
    set_fast_paths(enabled)
    try:
        yield
    finally:
        set_fast_paths(previous)


def register_kernel(op: str, device_type: str, fn: Callable | None) -> None:
    """Use `fn` for `op` on tensors of `device_type` ("cuda", "cpu", ...) when fast paths are on.

    `fn` takes the op's public arguments (all of them, keyword-complete, in the public order)
    and must match the reference numerically; pass None to remove a registration.
    """
    if op not in OPS:
        raise ValueError(f"Unknown kernel op {op!r}; ops that accept kernels: {list(OPS)}")
    if not isinstance(device_type, str) or not device_type or ":" in device_type:
        raise ValueError(
            f"device_type must be a device type such as 'cuda' or 'cpu' (no index), got {device_type!r}"
        )
    if fn is None:
        _kernels.pop((op, device_type), None)
    else:
        _kernels[(op, device_type)] = fn


def select(op: str, device_type: str, portable: Callable, reference: Callable) -> Callable:
    """The implementation of `op` to run now for a tensor on `device_type`."""
    if not _enabled:
        return reference
    return _kernels.get((op, device_type), portable)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an autocast-eligible matmul on `t` runs in: the autocast dtype when autocast
    is active for `t`'s device (float64 is never autocast, as in torch), else `t.dtype`."""
    device_type = t.device.type
    if t.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype
