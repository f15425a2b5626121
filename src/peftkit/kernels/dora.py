"""DoRA's per-output-row norm of W + s·B A, without forming the [out, in] matrix.

    ||W_i + s (B A)_i||² = ||W_i||² + 2 s Σ_k B_ik (W Aᵀ)_ik + s² Σ_k (B (A Aᵀ))_ik B_ik

||W_i||² is fixed (the base is frozen) and can be cached with `weight_row_sq_norm`; per step
the work is one [out, in] x [in, r] product (W Aᵀ) and O((out + in) r²) for the rest, and the
only temporaries of size [·, in] are row blocks of W upcast to fp32.

Precision: everything is accumulated in fp32 (fp64 for fp64 inputs) whatever the weight's
dtype; a bf16 weight is upcast block by block, never multiplied in bf16, because bf16's 8-bit
mantissa would put ~0.4% relative error into the cross term. The expansion loses precision
when W_i and s (B A)_i nearly cancel (error ~ eps·(||W_i||² + s²||(BA)_i||²) on a small
result): rows where the norm² falls below CANCELLATION of that sum are recomputed directly in
fp64 from their formed rows, in eager mode (it needs a data-dependent row set). DoRA treats
the norm as a constant in backward (as peft does), so all of this runs without autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import select
from ._gemm import linear_nt

__all__ = ["dora_weight_norm", "dora_weight_norm_reference", "weight_row_sq_norm"]

# Rows with ||W_i + s(BA)_i||² < CANCELLATION · (||W_i||² + s²||(BA)_i||²) are recomputed
# exactly; above it the expansion's relative error on the norm stays below ~eps/CANCELLATION.
CANCELLATION = 0.25

# Upcast row blocks of W hold at most this many elements (16 MiB in fp32).
_BLOCK_ELEMENTS = 4 * 2**20


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _row_blocks(weight: Tensor, fan_in_fan_out: bool, dtype: torch.dtype):
    """Yield (start, block) with block = rows [start, start+n) of the [out, in] weight in dtype."""
    w = weight.t() if fan_in_fan_out else weight
    rows = max(1, _BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start : start + rows].to(dtype)


def _check_args(fn, weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out) -> None:
    problems = []
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
            problems.append(f"{name} must be a 2-D floating-point tensor, got {_describe(t)}")
    if not problems:
        out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        r = lora_A.shape[0]
        if lora_A.shape[1] != in_f:
            problems.append(f"lora_A must be [r, {in_f}] for weight {tuple(weight.shape)}, got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (out_f, r):
            problems.append(f"lora_B must be [{out_f}, {r}], got {tuple(lora_B.shape)}")
        if weight_sq_norm is not None and (
            not isinstance(weight_sq_norm, Tensor) or tuple(weight_sq_norm.shape) != (out_f,)
        ):
            problems.append(f"weight_sq_norm must be None or a [{out_f}] tensor, got {_describe(weight_sq_norm)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        problems.append(f"scaling must be a Python float, got {scaling!r}")
    if problems:
        raise ValueError(f"{fn}: " + "; ".join(problems))


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return repr(t)


@torch.no_grad()
def weight_row_sq_norm(weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """||W_i||² per output row i, accumulated in fp32 (fp64 for fp64 weights): [out].
    Cache it for a frozen base weight and pass it to `dora_weight_norm`."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise ValueError(f"weight_row_sq_norm: weight must be a 2-D floating-point tensor, got {_describe(weight)}")
    acc = _acc_dtype(weight)
    out_f = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    result = torch.empty(out_f, dtype=acc, device=weight.device)
    for start, block in _row_blocks(weight, fan_in_fan_out, acc):
        result[start : start + block.shape[0]] = torch.linalg.vector_norm(block, dim=1).square()
    return result


@torch.no_grad()
def _dora_torch(weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out):
    acc = _acc_dtype(weight, lora_A, lora_B)
    A, B, s = lora_A.to(acc), lora_B.to(acc), float(scaling)
    if weight_sq_norm is None:
        weight_sq_norm = weight_row_sq_norm(weight, fan_in_fan_out)
    w_sq = weight_sq_norm.to(acc)

    cross = torch.empty_like(w_sq)  # Σ_k B_ik (W Aᵀ)_ik
    for start, block in _row_blocks(weight, fan_in_fan_out, acc):
        stop = start + block.shape[0]
        cross[start:stop] = (linear_nt(block, A) * B[start:stop]).sum(1)
    lora_sq = (torch.mm(B, torch.mm(A, A.t())) * B).sum(1)  # ||(B A)_i||²

    sq = w_sq + (2 * s) * cross + (s * s) * lora_sq
    if not torch.compiler.is_compiling():
        bad = (sq < CANCELLATION * (w_sq + (s * s) * lora_sq)).nonzero().squeeze(1)
        if bad.numel():
            sq[bad] = _exact_rows_sq(weight, A, B, s, bad, fan_in_fan_out).to(acc)
    return sq.clamp_min_(0).sqrt_()


def _exact_rows_sq(weight, A, B, s, rows, fan_in_fan_out) -> Tensor:
    """||W_i + s (B A)_i||² for the given rows, formed explicitly in fp64."""
    A64 = A.double()
    per_block = max(1, _BLOCK_ELEMENTS // max(1, A.shape[1]))
    parts = []
    for start in range(0, rows.numel(), per_block):
        idx = rows[start : start + per_block]
        w_rows = weight.index_select(1, idx).t() if fan_in_fan_out else weight.index_select(0, idx)
        formed = w_rows.double() + s * torch.mm(B.index_select(0, idx).double(), A64)
        parts.append(torch.linalg.vector_norm(formed, dim=1).square())
    return torch.cat(parts)


def dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    weight_sq_norm: Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """||weight + scaling · lora_B @ lora_A||₂ per output row, without forming the sum: [out].

    weight: [out, in] ([in, out] with fan_in_fan_out); lora_A: [r, in]; lora_B: [out, r];
    weight_sq_norm: cached `weight_row_sq_norm(weight, fan_in_fan_out)` or None. Returns fp32
    (fp64 if any input is fp64), detached: DoRA treats the norm as a constant in backward.
    With fast paths disabled this runs the reference.
    """
    _check_args("dora_weight_norm", weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out)
    impl = select("dora_weight_norm", _dora_torch, _reference)
    return impl(weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out)


def dora_weight_norm_reference(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    weight_sq_norm: Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """`dora_weight_norm` by forming weight + scaling · B A in fp32 (`weight_sq_norm` is
    accepted for a matching signature and ignored)."""
    _check_args("dora_weight_norm_reference", weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out)
    return _reference(weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out)


@torch.no_grad()
def _reference(weight, lora_A, lora_B, scaling, weight_sq_norm, fan_in_fan_out):
    acc = _acc_dtype(weight, lora_A, lora_B)
    w = weight.t() if fan_in_fan_out else weight
    formed = w.to(acc) + float(scaling) * torch.mm(lora_B.to(acc), lora_A.to(acc))
    return torch.linalg.vector_norm(formed, dim=1)
