"""LoRA linear as one autograd node: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

Against the plain composition of F.linear / F.dropout (what `peft` does), the fused node
- saves x once, in the compute dtype (no fp32 upcast copy, no dropped copy of x);
- keeps the dropout keep-mask packed at 2 bits per element for backward (peft keeps a
  dropped copy of x: 8x the bytes in bf16, 16x in fp32);
- folds s and the 1/(1-p) dropout rescale into the small [N, r] intermediate, and
  accumulates the LoRA term into the base output in place (no [N, out] temporaries).
Under torch.compile the op traces without graph breaks: with dropout, the seed is a traced
random tensor and drawing/packing/unpacking the mask are opaque custom ops (`peftkit::
dropout_apply`, `peftkit::dropout_unpack`) that run the same eager code (inductor cannot hold
SplitMix64's wrapping 64-bit constants).
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._dispatch import compute_dtype, select
from ._gemm import linear_nt

# Keep x·Aᵀ ([N, r]: r/in of x's bytes, 3% at r=16, in=512) for B's gradient rather than
# recomputing it in backward. benchmarks/kernels_micro.py ("fast-rc") measures both: recomputing
# saves those 3% and costs an extra [N, in] x [in, r] matmul; the time difference was within
# noise on CPU, so the cheaper-to-reason-about choice (no recompute) stays.
SAVE_XA = True

__all__ = ["lora_linear", "lora_linear_reference", "dropout_keep_mask"]


# The dropout probability is resolved to multiples of 2^-16: each element's keep decision
# compares a 16-bit lane of a 64-bit random value. The values are SplitMix64 outputs for the
# counters 0, 1, ... keyed by the seed: a pure function of (seed, index) computed with
# vectorised integer ops, so it runs on every core (torch's CPU generator, a sequential
# Mersenne Twister, was the cost of dropout on CPU) and a GPU kernel can reproduce it.
# Forward draws once and packs the mask for backward (see _pack_keep).
_P_LEVELS = 2**16
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
_THREAD_BUFFERS = threading.local()


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str) -> Tensor:
    """Bool mask, True where an element is kept (probability 1 - p, p rounded to 2^-16).

    A pure function of (seed, shape, p, device type): tests call it to reproduce the mask the
    fast path draws for a given seed.
    """
    shape = tuple(shape)
    keep, _ = _keep_lanes(seed, _numel(shape), p, device)
    return keep[: _numel(shape)].view(shape).bool()


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
    dropped = round(float(p) * _P_LEVELS)
    lanes = 4 * ((n + 3) // 4)
    if dropped >= _P_LEVELS:
        return torch.zeros(lanes, dtype=torch.int16, device=device), None
    bits, scratch = _random_bits(seed, lanes // 4, device)
    keep = bits.view(torch.int16)  # 4 uniform int16 lanes per value
    return torch.ge(keep, dropped - _P_LEVELS // 2, out=keep), scratch


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
    """[count] int64: i * golden (mod 2^64) for i = 0, 1, ...; kept per thread and device, so a
    mask's counters cost one pass (a state add) instead of three."""
    buffers = _THREAD_BUFFERS.__dict__.setdefault("weyl", {})
    key = torch.device(device)
    steps = buffers.get(key)
    if steps is None or steps.numel() < count:
        steps = buffers[key] = torch.arange(count, dtype=torch.int64, device=device).mul_(_GOLDEN)
    return steps[:count]


def _scratch(device, count: int, slot: str, dtype: torch.dtype = torch.int64) -> Tensor:
    """A reused [count] buffer of this thread (one per slot, dtype and device). On CPU fresh
    multi-MB tensors cost their page faults, about a third of drawing the mask; a buffer is
    only in use within one forward or one backward call of the op, which never nest."""
    buffers = _THREAD_BUFFERS.__dict__.setdefault("buffers", {})
    key = (torch.device(device), slot, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = buffers[key] = torch.empty(count, dtype=dtype, device=device)
    return buffer[:count]


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


# Under torch.compile: the mask code as opaque ops. They return fresh tensors (an op's output
# must not alias the per-thread scratch buffers), which costs one copy each; eager calls skip them.
@torch.library.custom_op("peftkit::dropout_apply", mutates_args=())
def _dropout_apply_op(x2: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(x2 · keep-mask, the mask packed) for the mask of `seed` (a one-element int64 tensor)."""
    keep, scratch = _keep_lanes(int(seed), x2.numel(), p, x2.device)
    packed = _pack_keep(keep, scratch)
    return _as_mask(keep, x2.numel(), x2.shape, x2.dtype).mul(x2), packed


@_dropout_apply_op.register_fake
def _(x2: Tensor, seed: Tensor, p: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x2), x2.new_empty(((x2.numel() + 3) // 4,), dtype=torch.uint8)


@torch.library.custom_op("peftkit::dropout_unpack", mutates_args=())
def _dropout_unpack_op(packed: Tensor, like: Tensor) -> Tensor:
    """The 0/1 mask of `packed` with the shape and dtype of `like`."""
    return _as_mask(_unpack_keep(packed), like.numel(), like.shape, like.dtype).clone()


@_dropout_unpack_op.register_fake
def _(packed: Tensor, like: Tensor) -> Tensor:
    return torch.empty_like(like)


def _keep_rescale(p: float) -> float:
    """1 / (1 - p) for p as the mask resolves it; 0 when everything is dropped."""
    kept = _P_LEVELS - round(float(p) * _P_LEVELS)
    return 0.0 if kept <= 0 else _P_LEVELS / kept


def _draw_seed() -> int:
    # From torch's global CPU generator: torch.manual_seed makes runs reproducible, and
    # activation checkpointing (which restores the RNG state) regenerates the same mask.
    return int(torch.randint(0, 2**62, (1,)).item())


def _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out) -> None:
    problems = []
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            problems.append(f"{name} must be a floating-point tensor, got {_describe(t)}")
    if problems:
        raise ValueError("lora_linear: " + "; ".join(problems))
    if x.dim() < 1:
        problems.append("x must have at least one dimension (features last), got a 0-d tensor")
    if weight.dim() != 2:
        problems.append(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    else:
        out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        layout = "[in, out] (fan_in_fan_out=True)" if fan_in_fan_out else "[out, in]"
        if x.dim() >= 1 and x.shape[-1] != in_f:
            problems.append(
                f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} laid out as "
                f"{layout} expects {in_f}"
            )
        if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
            problems.append(f"lora_A must be [r, {in_f}], got {tuple(lora_A.shape)}")
        r = lora_A.shape[0] if lora_A.dim() == 2 else None
        if lora_B.dim() != 2 or lora_B.shape[0] != out_f or (r is not None and lora_B.shape[1] != r):
            problems.append(f"lora_B must be [{out_f}, {r if r is not None else 'r'}], got {tuple(lora_B.shape)}")
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_f,)):
            problems.append(f"bias must be None or a tensor of shape [{out_f}], got {_describe(bias)}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        problems.append(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        problems.append(f"scaling must be a Python float, got {scaling!r}")
    if problems:
        raise ValueError("lora_linear: " + "; ".join(problems))


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return repr(t)


class _LoraLinearFn(torch.autograd.Function):
    """x is already in the compute dtype; weight, bias, A, B are cast to it on use."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, save_xa):
        cd = x.dtype
        x2 = x.reshape(-1, x.shape[-1])

        # The LoRA branch first, so the base product's output is the last large write (still
        # in cache for the next op); in-process A/B runs put this order 0-15 ms/step ahead on
        # this benchmark's shape, within the machine's noise.
        packed = None
        if dropout_p > 0 and torch.compiler.is_compiling():
            xk, packed = _dropout_apply_op(x2, seed, dropout_p)
        elif dropout_p > 0:
            keep, scratch = _keep_lanes(seed, x2.numel(), dropout_p, x.device)
            packed = _pack_keep(keep, scratch)
            del scratch
            xk = _as_mask(keep, x2.numel(), x2.shape, cd).mul_(x2)  # the mask's buffer becomes x·mask
            del keep
        else:
            xk = x2
        s = scaling * _keep_rescale(dropout_p)
        xa = torch.mm(xk, lora_A.to(cd).t()).mul_(s)  # [N, r]
        del xk
        w = weight.to(cd)
        y = linear_nt(x2, w.t() if fan_in_fan_out else w, None if bias is None else bias.to(cd))
        y.addmm_(xa, lora_B.to(cd).t())

        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa if save_xa else None, packed)
        ctx.scale = s
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa, packed = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        cd, s = x2.dtype, ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(cd)
        A, B = lora_A.to(cd), lora_B.to(cd)

        need_xk = need_A or (need_B and xa is None)  # the dropped input x·mask
        keep = None
        compiling = torch.compiler.is_compiling()
        if packed is not None and (need_x or need_xk):
            keep = _dropout_unpack_op(packed, x2) if compiling else _as_mask(_unpack_keep(packed), x2.numel(), x2.shape, cd)
        if not need_xk or keep is None:
            xk = x2 if need_xk else None
        elif compiling:
            xk = x2 * keep
        else:
            xk = torch.mul(x2, keep, out=_scratch(x2.device, x2.numel(), "xk", cd).view(x2.shape))

        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if need_B:
            if xa is None:
                xa = torch.mm(xk, A.t()).mul_(s)
            grad_B = torch.mm(g.t(), xa).to(lora_B.dtype)
        if need_x or need_A:
            g_b = torch.mm(g, B).mul_(s)  # [N, r]: dL/d(x Aᵀ), scale folded in
            if need_A:
                grad_A = torch.mm(g_b.t(), xk).to(lora_A.dtype)
            if need_x:
                w = weight.to(cd)
                grad_x = linear_nt(g, w if ctx.fan_in_fan_out else w.t())
                if keep is None:
                    grad_x.addmm_(g_b, A)
                else:  # the dropped branch's input grad, in xk's buffer (xk is used up)
                    grad_x.addcmul_(torch.mm(g_b, A) if xk is None else torch.mm(g_b, A, out=xk), keep)
                grad_x = grad_x.view(ctx.x_shape)
        del xk
        if need_w:
            gw = torch.mm(g.t(), x2)  # [out, in]
            grad_w = (gw.t() if ctx.fan_in_fan_out else gw).to(weight.dtype)
        if need_b:
            acc = torch.promote_types(cd, torch.float32)
            grad_b = g.sum(0, dtype=acc).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None


def _lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed):
    p = float(dropout_p) if training else 0.0
    seed = None
    if p > 0 and torch.compiler.is_compiling():
        # A traced random draw (no `.item()`, no graph break); the mask ops take it as a tensor.
        seed = torch.randint(0, 2**62, (1,)) if dropout_seed is None else torch.tensor([int(dropout_seed)])
    elif p > 0:
        seed = _draw_seed() if dropout_seed is None else int(dropout_seed)
    # Autocast does not reach into an autograd.Function, so cast x here the way autocast would;
    # the cast is differentiable and the Function then saves the low-precision copy only.
    x = x.to(compute_dtype(x))
    return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, float(scaling), p, seed, fan_in_fan_out, SAVE_XA)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    dropout_seed: int | None = None,
) -> Tensor:
    """y = x Wᵀ + bias + scaling · (dropout(x) lora_Aᵀ) lora_Bᵀ, fused.

    x: [..., in]. weight: [out, in] ([in, out] with fan_in_fan_out, as GPT-2's Conv1D), usually
    frozen. bias: [out] or None. lora_A: [r, in], lora_B: [out, r] (typically fp32 masters).
    The matmuls run in x's dtype (the autocast dtype under autocast); A, B, bias and weight get
    gradients in their own dtypes, each only if it requires grad. Dropout applies to the LoRA
    branch only when `training`; its mask comes from `dropout_seed` (see `dropout_keep_mask`;
    p is resolved to multiples of 2^-16), or a seed drawn from torch's global CPU generator
    when None. Returns [..., out].
    With fast paths disabled this runs `lora_linear_reference`.
    """
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    impl = select("lora_linear", x.device.type, _lora_linear_torch, _reference)
    return impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    dropout_seed: int | None = None,
) -> Tensor:
    """`lora_linear` from plain F.linear / F.dropout. With `dropout_seed` the mask is
    `dropout_keep_mask(dropout_seed, (N, in), p, x.device)` (N = all leading dims flattened),
    the same one `lora_linear` uses for that seed; without it, F.dropout's own random stream."""
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    return _reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed)


def _reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed):
    w = weight.t() if fan_in_fan_out else weight
    base = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if training and dropout_p > 0:
        if dropout_seed is None:
            x = F.dropout(x, dropout_p, training=True)
        else:
            keep = dropout_keep_mask(dropout_seed, (x.numel() // x.shape[-1], x.shape[-1]), dropout_p, x.device)
            x = x * keep.view(x.shape) * _keep_rescale(dropout_p)
    lora = F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base + lora * scaling
