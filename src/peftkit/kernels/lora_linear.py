"""LoRA linear as one autograd node: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

Against the plain composition of F.linear / F.dropout (what `peft` does), the fused node
- saves x once, in the compute dtype (no fp32 upcast copy, no dropped copy of x);
- keeps the dropout keep-mask packed at 2 bits per element for backward (peft keeps a
  dropped copy of x: 8x the bytes in bf16, 16x in fp32);
- folds s and the 1/(1-p) dropout rescale into the small [N, r] intermediate, and
  accumulates the LoRA term into the base output in place (no [N, out] temporaries).
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

# Keep x·Aᵀ ([N, r]: r/in of x's bytes, 3% at r=16, in=512) for B's gradient rather than
# recomputing it in backward. benchmarks/kernels_micro.py ("fast-rc") measures both: recomputing
# saves those 3% and costs an extra [N, in] x [in, r] matmul; the time difference was within
# noise on CPU, so the cheaper-to-reason-about choice (no recompute) stays.
SAVE_XA = True

__all__ = ["lora_linear", "lora_linear_reference"]


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
        xk = x2
        if dropout_p > 0:
            xk, packed = draw_and_apply(x2, seed, dropout_p)
        s = scaling * keep_rescale(dropout_p)
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
        masked = packed is not None and (need_x or need_xk)
        xk = None
        if need_xk:
            xk = apply_mask(x2, packed) if masked else x2

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
                if not masked:
                    grad_x.addmm_(g_b, A)
                else:  # the dropped branch's input grad, in xk's buffer (xk is used up)
                    add_masked_(grad_x, torch.mm(g_b, A) if xk is None else torch.mm(g_b, A, out=xk), packed)
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
        seed = draw_seed() if dropout_seed is None else int(dropout_seed)
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
            x = x * keep.view(x.shape) * keep_rescale(dropout_p)
    lora = F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base + lora * scaling
