"""LoRA linear as one autograd node: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

Against the plain composition of F.linear / F.dropout (what `peft` does), the fused node
- saves x once, in the compute dtype (no fp32 upcast copy, no dropped copy of x);
- keeps the dropout keep-mask packed at 2 bits per element for backward (peft keeps a
  dropped copy of x: 8x the bytes in bf16, 16x in fp32);
- folds s and the 1/(1-p) dropout rescale into the small [N, r] intermediate, and
  accumulates the LoRA term into the base output in place (no [N, out] temporaries; with an
  fp32 branch on a bf16 base, fp32 temporaries of a block of rows at a time).
Precision is peft's: peft casts x to lora_A's dtype, so fp32 adapters on a bf16/fp16 base keep
the branch in fp32 (x·Aᵀ, ·Bᵀ, their gradients), add it to the base output rounded to the base
dtype, and round the sum once; so does this op, upcasting its saved low-precision x (exactly)
where the branch needs it. Under autocast peft's F.linear of lora_A runs in the autocast dtype,
and so does the branch here. (The branch in bf16, this op's first form, had 1.4-1.8x peft's
error against fp32 in tests/methods/test_precision.py.)
The dropout mask itself (drawing, packing, applying; C kernels on CPU) is `dropout_mask`.
Under torch.compile the op traces without graph breaks: with dropout, the seed is a traced
random tensor and the mask work runs in opaque custom ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._dispatch import compute_dtype, select
from ._gemm import linear_nt
from .dropout_mask import add_masked_, apply_mask, draw_and_apply, draw_seed, dropout_keep_mask, keep_rescale

# x·Aᵀ ([N, r]: r/in of x's bytes, 3% at r=16, in=512) is kept for B's gradient rather than
# recomputed in backward: measured, recomputing saved those 3% for an extra [N, in] x [in, r]
# matmul, with the time difference within noise on CPU.

__all__ = ["lora_dropout", "lora_linear", "lora_linear_reference"]


def branch_dtype(x: Tensor, lora_A: Tensor, lora_B: Tensor) -> torch.dtype:
    """The dtype the LoRA branch runs in, as in peft: under autocast the autocast dtype (peft's
    F.linear of lora_A autocasts); otherwise the adapters' dtype (peft casts x to lora_A's),
    never below x's: fp32 masters on a bf16 base give an fp32 branch."""
    cd = compute_dtype(x)
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return cd
    return torch.promote_types(torch.promote_types(cd, lora_A.dtype), lora_B.dtype)


def lora_dropout(x: Tensor, p: float, seed: int | None = None) -> Tensor:
    """x · keep-mask / (1 - p) from plain torch ops (differentiable): the mask `lora_linear`
    draws for `seed` over x's elements in memory order, and without a seed one drawn from torch's
    global generator the way `lora_linear` draws it, so a plain path and the fused op see the
    same masks under the same `torch.manual_seed`. p is resolved to multiples of 2^-16."""
    if p <= 0:
        return x
    keep = dropout_keep_mask(draw_seed() if seed is None else int(seed), x.shape, p, x.device)
    return x * keep * keep_rescale(p)


def _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, out_dtype=None) -> None:
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
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        problems.append(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")
    if problems:
        raise ValueError("lora_linear: " + "; ".join(problems))


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return repr(t)


class _LoraLinearFn(torch.autograd.Function):
    """x is already in the compute dtype cd, weight and bias are cast to it on use; A and B to
    the branch dtype bd (cd, or wider: fp32 masters on a bf16 base). Returns base + branch in
    out_dtype, rounded once."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out, bd, out_dtype):
        cd = x.dtype
        x2 = x.reshape(-1, x.shape[-1])

        # The LoRA branch first, so the base product's output is the last large write (still
        # in cache for the next op); in-process A/B runs put this order 0-15 ms/step ahead on
        # this benchmark's shape, within the machine's noise.
        packed = None
        xk = x2
        if dropout_p > 0:
            xk, packed = draw_and_apply(x2, seed, dropout_p)
        s = scaling * keep_rescale(dropout_p)
        A, B = lora_A.to(bd), lora_B.to(bd)
        xa = torch.mm(xk, A.t()).mul_(s) if bd == cd else _wide_xa(xk, None, A, s)  # [N, r], in bd
        del xk
        w = weight.to(cd)
        y = linear_nt(x2, w.t() if fan_in_fan_out else w, None if bias is None else bias.to(cd))
        if bd == cd:  # accumulate the branch into the base output in place (no [N, out] temporary)
            y.addmm_(xa, B.t())
        elif out_dtype == cd:  # peft's order: the base rounded to cd, plus the bd branch, rounded once
            for rows in _blocks(y.shape[0], y.shape[1], bd):
                y[rows] = torch.mm(xa[rows], B.t()).add_(y[rows])
        else:  # the unrounded sum is the output (DoRA scales it before rounding)
            y = torch.mm(xa, B.t()).add_(y)
        y = y.to(out_dtype)

        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa, packed)
        ctx.scale, ctx.bd = s, bd
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, xa, packed = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        cd, bd, s = x2.dtype, ctx.bd, ctx.scale
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        g = g2.to(cd)  # the base's output gradient, in cd (as peft's base output, which is cd)
        A, B = lora_A.to(bd), lora_B.to(bd)

        def base_grad_x():  # dL/dx of the base, in cd: a new tensor the branch's part is added to
            w = weight.to(cd)
            return linear_nt(g, w if ctx.fan_in_fan_out else w.t())

        base_grad_x = base_grad_x if need_x else None
        if bd == cd:
            grad_x, grad_A, grad_B = _branch_backward(x2, g, A, B, xa, packed, s, need_A, need_B, base_grad_x)
        else:
            grad_x, grad_A, grad_B = _wide_branch_backward(x2, g2, A, B, xa, packed, s, need_A, need_B, base_grad_x)
        grad_w = grad_b = None
        if need_x:
            grad_x = grad_x.view(ctx.x_shape)
        if need_A:
            grad_A = grad_A.to(lora_A.dtype)
        if need_B:
            grad_B = grad_B.to(lora_B.dtype)
        if need_w:
            gw = torch.mm(g.t(), x2)  # [out, in]
            grad_w = (gw.t() if ctx.fan_in_fan_out else gw).to(weight.dtype)
        if need_b:
            acc = torch.promote_types(cd, torch.float32)
            grad_b = g.sum(0, dtype=acc).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None, None


def _branch_backward(x2, g, A, B, xa, packed, s, need_A, need_B, base_grad_x):
    """(grad_x, grad_A, grad_B) with the branch in x's dtype; grad_x adds into the base's."""
    masked = packed is not None and (base_grad_x is not None or need_A)
    xk = None
    if need_A:  # the dropped input x·mask
        xk = apply_mask(x2, packed) if masked else x2

    grad_x = grad_A = grad_B = None
    if need_B:
        grad_B = torch.mm(g.t(), xa)
    if base_grad_x is not None or need_A:
        g_b = torch.mm(g, B).mul_(s)  # [N, r]: dL/d(x Aᵀ), scale folded in
        if need_A:
            grad_A = torch.mm(g_b.t(), xk)
        if base_grad_x is not None:
            grad_x = base_grad_x()
            if not masked:
                grad_x.addmm_(g_b, A)
            else:  # the dropped branch's input grad, in xk's buffer (xk is used up)
                add_masked_(grad_x, torch.mm(g_b, A) if xk is None else torch.mm(g_b, A, out=xk), packed)
    return grad_x, grad_A, grad_B


# --- the branch wider than the compute dtype (fp32 masters on a bf16/fp16 base) -----------------
# Its [rows, features] temporaries (x upcast, the branch's output and input gradient) are made
# WIDE_BLOCK_BYTES at a time. Whole, they were fp32 copies of x, y and dL/dx: the op's peak
# memory in a step (benchmarks/kernels_micro.py, [1024, 512 -> 512] bf16) went from 2.2 MiB
# (branch in bf16) to 9.2 MiB (peft: 8.1); in 256 KiB blocks it is 2.9 MiB (1 MiB blocks: 5.2).
WIDE_BLOCK_BYTES = 1 << 18


def _blocks(n: int, width: int, dtype: torch.dtype):
    """Row slices of an [n, width] matrix of about WIDE_BLOCK_BYTES in `dtype`; a multiple of 4
    rows, so that a block starts on a byte of the packed mask. One block under torch.compile
    (inductor plans its buffers itself)."""
    rows = n if torch.compiler.is_compiling() else max(4, WIDE_BLOCK_BYTES // (width * dtype.itemsize) // 4 * 4)
    for start in range(0, n, max(rows, 1)):
        yield slice(start, start + rows)


def _masked_rows(x2: Tensor, packed: Tensor | None, rows: slice) -> Tensor:
    part = x2[rows]
    return part if packed is None else apply_mask(part, packed[rows.start * x2.shape[1] // 4:])


def _wide_xa(x2: Tensor, packed: Tensor | None, A: Tensor, s: float) -> Tensor:
    """x·mask·Aᵀ·s [N, r] in A's dtype, x upcast (exactly) a block of rows at a time."""
    xa = x2.new_empty((x2.shape[0], A.shape[0]), dtype=A.dtype)
    for rows in _blocks(x2.shape[0], x2.shape[1], A.dtype):
        xa[rows] = linear_nt(_masked_rows(x2, packed, rows).to(A.dtype), A)
    return xa.mul_(s)


def _wide_branch_backward(x2, g2, A, B, xa, packed, s, need_A, need_B, base_grad_x):
    """`_branch_backward` with the branch in A's dtype, as peft's upcast branch: it receives the
    output gradient upcast, and its input gradient is added to the base's (rounded to x's dtype
    as the base's output) before one rounding to x's dtype."""
    bd, n = A.dtype, x2.shape[0]
    grad_x = grad_A = None
    grad_B = torch.zeros_like(B) if need_B else None
    g_b = x2.new_empty((n, A.shape[0]), dtype=bd) if base_grad_x is not None or need_A else None
    for rows in _blocks(n, g2.shape[1], bd):
        gb = g2[rows].to(bd)
        if need_B:
            grad_B.addmm_(gb.t(), xa[rows])
        if g_b is not None:
            g_b[rows] = torch.mm(gb, B)
    if g_b is None:
        return grad_x, grad_A, grad_B
    g_b.mul_(s)  # [N, r]: dL/d(x Aᵀ), scale folded in
    if need_A:
        grad_A = torch.zeros_like(A)
        for rows in _blocks(n, x2.shape[1], bd):
            grad_A.addmm_(g_b[rows].t(), _masked_rows(x2, packed, rows).to(bd))
    if base_grad_x is not None:
        grad_x = base_grad_x()
        for rows in _blocks(n, x2.shape[1], bd):
            t = torch.mm(g_b[rows], A)
            t = t if packed is None else apply_mask(t, packed[rows.start * x2.shape[1] // 4:])
            grad_x[rows] = t.add_(grad_x[rows])
    return grad_x, grad_A, grad_B


def _lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed,
                       out_dtype):
    p = float(dropout_p) if training else 0.0
    seed = None
    if p > 0 and torch.compiler.is_compiling():
        # A traced random draw (no `.item()`, no graph break); the mask ops take it as a tensor.
        seed = torch.randint(0, 2**62, (1,)) if dropout_seed is None else torch.tensor([int(dropout_seed)])
    elif p > 0:
        seed = draw_seed() if dropout_seed is None else int(dropout_seed)
    # Autocast does not reach into an autograd.Function, so cast x here the way autocast would;
    # the cast is differentiable and the Function then saves the low-precision copy only.
    bd = branch_dtype(x, lora_A, lora_B)
    x = x.to(compute_dtype(x))
    return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, float(scaling), p, seed, fan_in_fan_out,
                               bd, out_dtype or x.dtype)


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
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """y = x Wᵀ + bias + scaling · (dropout(x) lora_Aᵀ) lora_Bᵀ, fused.

    x: [..., in]. weight: [out, in] ([in, out] with fan_in_fan_out, as GPT-2's Conv1D), usually
    frozen. bias: [out] or None. lora_A: [r, in], lora_B: [out, r] (typically fp32 masters).
    The base matmul runs in x's dtype (the autocast dtype under autocast), the LoRA branch in
    `branch_dtype` (fp32 for fp32 masters, as in peft); A, B, bias and weight get gradients in
    their own dtypes, each only if it requires grad. Dropout applies to the LoRA branch only
    when `training`; its mask comes from `dropout_seed` (see `dropout_keep_mask`; p is resolved
    to multiples of 2^-16), or a seed drawn from torch's global CPU generator when None.
    Returns [..., out] in `out_dtype`, by default x's compute dtype (DoRA asks for the branch
    dtype, to scale the sum before its one rounding).
    With fast paths disabled this runs `lora_linear_reference`.
    """
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, out_dtype)
    impl = select("lora_linear", _lora_linear_torch, _reference)
    return impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed,
                out_dtype)


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
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """`lora_linear` from plain F.linear as peft composes it (x cast to lora_A's dtype for the
    branch, the sum cast back to the base output's dtype, or to `out_dtype`). The dropout mask
    is `lora_dropout`'s: `dropout_keep_mask(dropout_seed, x.shape, p, x.device)`, the one
    `lora_linear` uses for that seed, with a seed drawn as `lora_linear` draws it when None."""
    _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, out_dtype)
    return _reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed,
                      out_dtype)


def _reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out, dropout_seed,
               out_dtype=None):
    w = weight.t() if fan_in_fan_out else weight
    base = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    xl = x.to(torch.promote_types(x.dtype, lora_A.dtype))
    if training and dropout_p > 0:
        xl = lora_dropout(xl, float(dropout_p), dropout_seed)
    lora = F.linear(F.linear(xl, lora_A.to(xl.dtype)), lora_B.to(xl.dtype))
    return (base + lora * scaling).to(out_dtype or base.dtype)
