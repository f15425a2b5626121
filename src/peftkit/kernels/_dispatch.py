"""The fast-path switches: one per op, and one over all of them.

Every public op in `peftkit.kernels` routes through `select()`: with its switch off (or the
global one) it runs the plain reference implementation, else the fast one. The ops:

- "lora_linear": the fused LoRA autograd op (`kernels.lora_linear`);
- "linear_cross_entropy": the chunked lm_head + cross-entropy (`kernels.linear_cross_entropy`,
  and the causal-LM loss `PeftModel.forward` computes from the hidden states);
- "dora_weight_norm": DoRA's norm without forming the weight (`kernels.dora_weight_norm`);
- "attention": the attention kernel (`kernels.attention`, and the models routed to it by
  `peftkit.enable_fast_attention`).

The C dropout kernels have their own switch, PEFTKIT_NATIVE_KERNELS (`_native`): they are the
same mask, computed faster, not another path.

The switches are process-global (not thread-local) and read at call time, so flipping one
takes effect on the next call; torch.compile guards on them and recompiles if they change.
In the environment, PEFTKIT_FAST_PATHS sets them at import: an on/off word for all of them
(`0`: every reference path), or a comma-separated list of ops each prefixed by `-` (off) or
`+` (on), e.g. `PEFTKIT_FAST_PATHS=-attention,-lora_linear`.
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


def _initial_state() -> tuple[bool, dict[str, bool]]:
    """(the global switch, each op's switch) from PEFTKIT_FAST_PATHS."""
    raw = os.environ.get("PEFTKIT_FAST_PATHS", "1").strip().lower()
    ops = dict.fromkeys(OPS, True)
    if raw in _TRUE_WORDS or raw in _FALSE_WORDS:
        return raw in _TRUE_WORDS, ops
    for item in (part.strip() for part in raw.split(",")):
        sign, op = item[:1], item[1:].strip()
        if sign not in ("-", "+") or op not in OPS:
            raise ValueError(
                f"PEFTKIT_FAST_PATHS={raw!r}: {item!r} is not understood; use an on/off word "
                f"({sorted(_TRUE_WORDS - {''})} or {sorted(_FALSE_WORDS)}) or a comma-separated list of "
                f"'-op' (off) / '+op' (on) with op one of {list(OPS)}"
            )
        ops[op] = sign == "+"
    return True, ops


_enabled, _op_enabled = _initial_state()


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown fast path {op!r}; the fast paths are {list(OPS)}")


def set_fast_paths(enabled: bool) -> None:
    """All fast paths at once: on (True, the default; each op's own switch still applies) or
    off (False: every op runs its plain reference path)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_paths expects a bool, got {enabled!r}")
    _enabled = enabled


def set_fast_path(op: str, enabled: bool) -> None:
    """One op's fast path on (True, the default) or off (False: its reference path), `op` one
    of `OPS`. Takes effect only while the global switch (`set_fast_paths`) is on."""
    _check_op(op)
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_path({op!r}, ...) expects a bool, got {enabled!r}")
    _op_enabled[op] = enabled


def fast_paths_enabled(op: str | None = None) -> bool:
    """Whether `op` (one of `OPS`) uses its fast path now: its switch and the global one are
    on. Without `op`, the global switch alone."""
    if op is None:
        return _enabled
    _check_op(op)
    return _enabled and _op_enabled[op]


@contextmanager
def fast_paths(enabled: bool, *ops: str) -> Iterator[None]:
    """Context manager form of `set_fast_paths` (no `ops`) or of `set_fast_path` for each of
    `ops`, e.g. `with fast_paths(False, "attention"):`; restores the previous settings on exit."""
    global _enabled
    for op in ops:
        _check_op(op)
    previous = (_enabled, dict(_op_enabled))
    try:
        if ops:
            for op in ops:
                set_fast_path(op, enabled)
        else:
            set_fast_paths(enabled)
        yield
    finally:
        _enabled = previous[0]
        _op_enabled.update(previous[1])


def select(op: str, portable: Callable, reference: Callable) -> Callable:
    """The implementation of `op` to run now: `portable` (the fast path) or `reference`."""
    return portable if _enabled and _op_enabled[op] else reference


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an autocast-eligible matmul on `t` runs in: the autocast dtype when autocast
    is active for `t`'s device (float64 is never autocast, as in torch), else `t.dtype`."""
    device_type = t.device.type
    if t.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype
