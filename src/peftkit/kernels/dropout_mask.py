"""The LoRA dropout keep-mask: drawn from (seed, element index), packed for backward, applied.

The dropout probability is resolved to multiples of 2^-16: each element's keep decision
compares a 16-bit lane of a 64-bit random value. The values are SplitMix64 outputs for the
counters 0, 1, ... keyed by the seed: a pure function of (seed, index), so any device and any
thread split gives the same mask (torch's CPU generator, a sequential Mersenne Twister, was the
cost of dropout on CPU). Forward draws it once and keeps it packed at 2 bits per element
(one byte per four elements); backward unpacks it.

Two implementations, bit-identical (a test holds them equal):
- torch ops (any device): the definition, used by `dropout_keep_mask` and wherever the C
  kernels do not apply;
- C kernels (`dropout_mask.c`, via `_native`) for contiguous fp32/bf16 CPU tensors: the torch
  form is ~20 elementwise passes per mask, each a fork/join of the thread pool; one pass per
  call is 2.5-5x faster, and dropout's share of a 2-thread training step fell from 12-14% to
  5% (benchmarks/README.md).
Under torch.compile the mask work runs inside opaque custom ops (`peftkit::dropout_apply`,
`peftkit::dropout_mask_mul`): inductor cannot hold SplitMix64's wrapping 64-bit constants.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch
from torch import Tensor

from . import _native
from . import _scratch as scratch_buffers

__all__ = ["add_masked_", "apply_mask", "draw_and_apply", "draw_seed", "dropout_keep_mask", "keep_rescale"]

P_LEVELS = 2**16
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as int64: SplitMix64's counter step
_MIX = ((30, -0x40A7B892E31B1A47), (27, -0x6B2FB644ECCEEE15), (31, None))  # (shift, multiplier)
# 1.0 as a 16-bit float bit pattern: a 0/1 int16 mask times this, viewed as the float dtype,
# is the 0.0/1.0 mask. On CPU, comparing straight into a bf16/fp16 output is not vectorised
# (~10x slower than comparing into int16 and this multiply).
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
# Packing: four 0/1 int16 lanes seen as one int64 (bits 0, 16, 32, 48) times _GATHER put the
# four bits at 48..51 with every other product bit below 48 (no carries, nothing above 51);
# a nibble times _SPREAD (< 2^49) masked by _LANES unfolds them.
_GATHER = (1 << 48) | (1 << 33) | (1 << 18) | (1 << 3)
_SPREAD = 1 | (1 << 15) | (1 << 30) | (1 << 45)
_LANES = 1 | (1 << 16) | (1 << 32) | (1 << 48)


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str) -> Tensor:
    """Bool mask, True where an element is kept (probability 1 - p, p rounded to 2^-16).

    A pure function of (seed, shape, p): tests call it to reproduce the mask the fast path
    draws for a given seed.
    """
    shape = tuple(shape)
    keep, _ = _keep_lanes(seed, _numel(shape), p, device)
    return keep[: _numel(shape)].view(shape).bool()


def keep_rescale(p: float) -> float:
    """1 / (1 - p) for p as the mask resolves it; 0 when everything is dropped."""
    kept = P_LEVELS - round(float(p) * P_LEVELS)
    return 0.0 if kept <= 0 else P_LEVELS / kept


def draw_seed() -> int:
    # From torch's global CPU generator: torch.manual_seed makes runs reproducible, and
    # activation checkpointing (which restores the RNG state) regenerates the same mask.
    return int(torch.randint(0, 2**62, (1,)).item())


def draw_and_apply(x2: Tensor, seed: int | Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x2 · keep-mask, the mask packed: [ceil(n / 4)] uint8) for the mask of `seed`.

    Eager, x2 · mask is a per-thread scratch buffer, valid until this thread's next call here;
    under torch.compile `seed` is a one-element int64 tensor and both results are fresh.
    """
    if torch.compiler.is_compiling():
        return _dropout_apply_op(x2, seed, p)
    return _draw_and_apply_eager(x2, int(seed), p, fresh=False)


def apply_mask(x: Tensor, packed: Tensor) -> Tensor:
    """x · mask for a packed mask (of x.numel() elements). Eager, a per-thread scratch buffer
    (as `draw_and_apply`'s, but another one); under torch.compile a fresh tensor."""
    _check_packed(packed, x.numel())
    if torch.compiler.is_compiling():
        return _mask_mul_op(x, packed)
    return _apply_mask_eager(x, packed, fresh=False)


def add_masked_(acc: Tensor, t: Tensor, packed: Tensor) -> Tensor:
    """acc += t · mask in place (acc, t: same shape and dtype; one rounding, as addcmul_)."""
    _check_packed(packed, t.numel())
    if acc.shape != t.shape or acc.dtype != t.dtype:
        raise ValueError(f"add_masked_: acc {tuple(acc.shape)} {acc.dtype} and t {tuple(t.shape)} {t.dtype} "
                         "must have the same shape and dtype")
    if torch.compiler.is_compiling():
        return acc.add_(_mask_mul_op(t, packed))
    lib = _kernels_for(t) if acc.is_contiguous() else None
    if lib is None:
        return acc.addcmul_(t, _as_mask(_unpack_keep(packed), t.numel(), t.shape, t.dtype))
    _call(lib, "add", t, acc.data_ptr(), t.data_ptr(), packed.data_ptr(), t.numel(), _native.omp_threads())
    return acc


def _check_packed(packed: Tensor, n: int) -> None:
    # The C kernels read ceil(n / 4) bytes: a smaller or foreign mask must not reach them.
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() < (n + 3) // 4 or not packed.is_contiguous():
        raise ValueError(f"packed mask must be a contiguous 1-D uint8 tensor of >= {(n + 3) // 4} bytes for "
                         f"{n} elements, got {tuple(packed.shape)} {packed.dtype}")


# --- C kernels ---------------------------------------------------------------------------------
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_C_ARGS = {
    "draw_apply": [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int],
    "apply": [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int],
    "add": [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int],
}


def _library() -> ctypes.CDLL | None:
    lib = _native.load("dropout_mask")
    if lib is not None and not getattr(lib, "_peftkit_typed", False):
        for name, args in _C_ARGS.items():
            for suffix in _SUFFIX.values():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = args, None
        lib._peftkit_typed = True
    return lib


def _kernels_for(t: Tensor) -> ctypes.CDLL | None:
    """The C kernels where they apply to `t` (contiguous fp32/bf16 on CPU), else None."""
    if t.device.type != "cpu" or t.dtype not in _SUFFIX or not t.is_contiguous():
        return None
    return _library()


def _call(lib: ctypes.CDLL, name: str, t: Tensor, *args) -> None:
    getattr(lib, f"{name}_{_SUFFIX[t.dtype]}")(*args)


def _draw_and_apply_eager(x2: Tensor, seed: int, p: float, fresh: bool) -> tuple[Tensor, Tensor]:
    """`draw_and_apply` outside compile; `fresh`: x2 · mask in a new tensor, not a scratch buffer."""
    n = x2.numel()
    dropped = round(float(p) * P_LEVELS)
    lib = _kernels_for(x2) if dropped < P_LEVELS else None
    if lib is not None:
        xk = torch.empty_like(x2) if fresh else _scratch(x2.device, n, "xk_forward", x2.dtype).view(x2.shape)
        packed = torch.empty((n + 3) // 4, dtype=torch.uint8)
        _call(lib, "draw_apply", x2, x2.data_ptr(), xk.data_ptr(), packed.data_ptr(), n,
              seed % (1 << 64), dropped, _native.omp_threads())
        return xk, packed
    keep, scratch = _keep_lanes(seed, n, p, x2.device)
    packed = _pack_keep(keep, scratch)
    del scratch
    xk = _as_mask(keep, n, x2.shape, x2.dtype).mul_(x2)  # the mask's buffer becomes x·mask
    return (xk.clone() if fresh else xk), packed


def _apply_mask_eager(x: Tensor, packed: Tensor, fresh: bool) -> Tensor:
    out = torch.empty_like(x) if fresh else _scratch(x.device, x.numel(), "applied", x.dtype).view(x.shape)
    lib = _kernels_for(x) if out.is_contiguous() else None
    if lib is None:
        return torch.mul(x, _as_mask(_unpack_keep(packed), x.numel(), x.shape, x.dtype), out=out)
    _call(lib, "apply", x, x.data_ptr(), packed.data_ptr(), out.data_ptr(), x.numel(), _native.omp_threads())
    return out


# --- torch implementation (the definition) --------------------------------------------------------
def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


@torch.compiler.disable  # eager under torch.compile: inductor cannot hold 64-bit wrapping constants
def _keep_lanes(seed: int, n: int, p: float, device) -> tuple[Tensor, Tensor | None]:
    """0/1 int16 keep decisions, n rounded up to a multiple of 4 (the tail is never used), and
    a free int64 buffer of a quarter of their length (for `_pack_keep`; None if p = 1).

    Every buffer is written in place: on CPU a fresh large tensor costs its page faults, which
    were a third of the mask's time."""
    dropped = round(float(p) * P_LEVELS)
    lanes = 4 * ((n + 3) // 4)
    if dropped >= P_LEVELS:
        return torch.zeros(lanes, dtype=torch.int16, device=device), None
    bits, scratch = _random_bits(seed, lanes // 4, device)
    keep = bits.view(torch.int16)  # 4 uniform int16 lanes per value
    return torch.ge(keep, dropped - P_LEVELS // 2, out=keep), scratch


def _random_bits(seed: int, count: int, device) -> tuple[Tensor, Tensor]:
    """[count] int64, uniform over all 64 bits: SplitMix64 of the states seed + (i + 1) * golden
    (integer multiplies wrap modulo 2^64, as SplitMix64 expects); and the scratch buffer used."""
    state = (int(seed) + _GOLDEN) % (1 << 64)
    z = torch.add(_weyl_steps(device, count), state - (1 << 64) * (state >> 63), out=_scratch(device, count, "bits"))
    spare = _scratch(device, count, "spare")
    for shift, multiplier in _MIX:
        # z ^= z >>> shift (a logical shift: the arithmetic one, its sign copies masked off)
        torch.bitwise_right_shift(z, shift, out=spare).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(spare)
        if multiplier is not None:
            z.mul_(multiplier)
    return z, spare


def _weyl_steps(device, count: int) -> Tensor:
    """[count] int64: i * golden (mod 2^64) for i = 0, 1, ...; kept per thread and device (within
    the mask's budget in `kernels._scratch`), so a mask's counters cost one pass (a state add)
    instead of three."""
    key = (torch.device(device), "dropout/weyl", torch.int64)
    steps = scratch_buffers.held().get(key)
    if steps is None or steps.numel() < count:
        steps = scratch_buffers.keep(key, torch.arange(count, dtype=torch.int64, device=device).mul_(_GOLDEN))
    return steps[:count]


def _scratch(device, count: int, slot: str, dtype: torch.dtype = torch.int64) -> Tensor:
    """This thread's dropout-mask buffer `slot` (`kernels._scratch`; never held by a caller of
    the mask functions beyond one forward or backward call of the op)."""
    return scratch_buffers.scratch(device, count, "dropout/" + slot, dtype)


@torch.compiler.disable  # bit-exact as in eager (64-bit products that overflow by design)
def _pack_keep(keep: Tensor, scratch: Tensor | None = None) -> Tensor:
    """[4k] 0/1 int16 -> [k] uint8, one nibble per four elements (2 bits per element);
    `scratch`, if given, is a free [k] int64 buffer to work in."""
    lanes = keep.view(torch.int64)
    gathered = lanes.mul(_GATHER) if scratch is None else torch.mul(lanes, _GATHER, out=scratch)
    return gathered.bitwise_right_shift_(48).to(torch.uint8)


@torch.compiler.disable
def _unpack_keep(packed: Tensor) -> Tensor:
    """`_pack_keep` undone: [k] uint8 -> [4k] 0/1 int16."""
    lanes = _scratch(packed.device, packed.numel(), "unpack").copy_(packed)
    return lanes.mul_(_SPREAD).bitwise_and_(_LANES).view(torch.int16)


def _as_mask(keep: Tensor, n: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """0/1 int16 lanes as a 0.0/1.0 mask of `shape` in `dtype` (consumes `keep`).

    On CPU a same-dtype multiply is ~8x faster than torch.where or a bool operand (mixed-dtype
    elementwise kernels are not vectorised there), so the mask comes in the compute dtype.
    """
    if dtype in _ONE_BITS:
        mask = keep.mul_(_ONE_BITS[dtype]).view(dtype)
    else:
        mask = _scratch(keep.device, keep.numel(), "mask", dtype).copy_(keep)
    return mask[:n].view(shape)


# --- under torch.compile: opaque ops running the eager code ---------------------------------------
# Their outputs are fresh tensors: an op's output must not alias the per-thread scratch buffers.
@torch.library.custom_op("peftkit::dropout_apply", mutates_args=())
def _dropout_apply_op(x2: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x2 · keep-mask, the mask packed) for the mask of `seed` (a one-element int64 tensor)."""
    return _draw_and_apply_eager(x2.contiguous(), int(seed), p, fresh=True)


@_dropout_apply_op.register_fake
def _(x2: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x2), x2.new_empty(((x2.numel() + 3) // 4,), dtype=torch.uint8)


@torch.library.custom_op("peftkit::dropout_mask_mul", mutates_args=())
def _mask_mul_op(x: Tensor, packed: Tensor) -> Tensor:
    """x · the packed mask, as a new tensor."""
    return _apply_mask_eager(x.contiguous(), packed, fresh=True)


@_mask_mul_op.register_fake
def _(x: Tensor, packed: Tensor) -> Tensor:
    return torch.empty_like(x)
