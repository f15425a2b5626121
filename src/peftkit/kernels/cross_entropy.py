"""lm_head + cross-entropy fused so the full [N, V] logits never exist.

The reference (`F.linear` then `F.cross_entropy` on fp32 logits) keeps the logits and their
fp32 log-softmax alive until backward: at V = 32000 that is ~half of a small model's saved
activations. Here rows are processed in chunks; each chunk's fp32 logits give its loss and,
when gradients are wanted, its softmax gradient right away (the gradients of the summed loss
wrt hidden / weight / bias are accumulated during forward and only scaled by the incoming
gradient in backward). That is 3 matmuls per chunk instead of the 4 a recompute-in-backward
scheme needs, and what is kept for backward is grad_hidden — the size of hidden itself.

Rows whose label is `ignore_index` (prompt tokens, padding, the last position after the
causal shift) are dropped before any matmul in eager mode; under torch.compile (no
data-dependent shapes) they are computed and masked instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._dispatch import compute_dtype, select
from ._gemm import linear_nt, onednn_fp32_available, product_into, slow_16bit_gemm, upcast_to_scratch

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "causal_lm_loss",
    "causal_lm_loss_reference",
    "auto_chunk_rows",
]

# Budget for one chunk's fp32 logits. The chunk's transient working set is ~2.5x this (the
# logits in the compute dtype, their fp32 upcast turned into probabilities in place, and the
# probabilities cast back for the gradient matmuls). 32 MiB is 256 rows at V = 32000 and 64
# rows at V = 128k: enough rows for the matmuls to run at full speed, small next to the
# activations of any model worth fusing for.
CHUNK_BYTES = 32 * 2**20

_REDUCTIONS = ("sum", "mean")


def auto_chunk_rows(vocab_size: int, n_rows: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `chunk_bytes` (a multiple of
    8 when at least 8, at least 1, at most `n_rows`)."""
    rows = max(1, chunk_bytes // (4 * max(1, vocab_size)))
    if rows >= 8:
        rows -= rows % 8
    return max(1, min(rows, n_rows))


def _check_args(fn, hidden, weight, labels, bias, chunk_size, reduction, ndim) -> None:
    problems = []
    lead = "[N, H]" if ndim == 2 else "[B, T, H]"
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() != ndim:
        problems.append(f"hidden must be a floating-point {lead} tensor, got {_describe(hidden)}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        problems.append(f"weight must be a floating-point [V, H] tensor, got {_describe(weight)}")
    elif isinstance(hidden, Tensor) and hidden.dim() == ndim and weight.shape[1] != hidden.shape[-1]:
        problems.append(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    want_labels = tuple(hidden.shape[:-1]) if isinstance(hidden, Tensor) and hidden.dim() == ndim else None
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        problems.append(f"labels must be an integer tensor, got {_describe(labels)}")
    elif want_labels is not None and tuple(labels.shape) != want_labels:
        problems.append(f"labels must have shape {list(want_labels)} to match hidden, got {list(labels.shape)}")
    if bias is not None:
        v = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else "V"
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (v,):
            problems.append(f"bias must be None or a [{v}] tensor, got {_describe(bias)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        problems.append(f"chunk_size must be None (sized by memory) or a positive int, got {chunk_size!r}")
    if reduction not in _REDUCTIONS:
        problems.append(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    if problems:
        raise ValueError(f"{fn}: " + "; ".join(problems))


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"tensor of shape {list(t.shape)} and dtype {t.dtype}"
    return repr(t)


def _chunk_pass(h, w, b, labels, valid, rows, cd, want_h, want_w, want_b):
    """Summed CE over rows of h, plus the gradients of that sum that are wanted.

    h [M, H] (any float dtype; cast per chunk to cd), w [V, H] and b [V] already in cd,
    labels [M] int64 in range wherever counted, valid [M] bool or None (all rows count).
    Returns (loss fp32 scalar, grad_h [M, H] in cd, grad_w [V, H] fp32, grad_b [V] fp32),
    the gradients None where not wanted.
    """
    acc = torch.promote_types(cd, torch.float32)
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty(h.shape, dtype=cd, device=h.device) if want_h else None
    grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if want_w else None
    grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if want_b else None
    # One pair of chunk buffers for the whole pass: a fresh multi-MB allocation per chunk
    # costs a page fault per 4 KiB page on CPU (~8 ms per 32 MB chunk measured), more than
    # the elementwise work on it.
    rows = max(1, min(rows, h.shape[0]))
    low = cd != acc
    # bf16 / fp16 without native GEMMs: the logits and the hidden-state gradient computed in fp32
    # by `product_into`, rounded once (5-10x faster there than torch's 16-bit kernel)
    via_fp32 = low and not torch.compiler.is_compiling() and slow_16bit_gemm(w)
    b32 = None if b is None or not via_fp32 else b.float()
    # cd fp32 (or wider) on a CPU: the logits are computed into the fp32 buffer too (no fresh
    # chunk-sized output per chunk), except where linear_nt takes oneDNN, which returns a new tensor
    fp32_into_buffer = not low and h.device.type == "cpu" and not onednn_fp32_available()
    buf_cd = torch.empty((rows, w.shape[0]), dtype=cd, device=h.device) if low else None
    buf_acc = torch.empty((rows, w.shape[0]), dtype=acc, device=h.device) if low or fp32_into_buffer else None
    for start in range(0, h.shape[0], rows):
        end = min(start + rows, h.shape[0])
        hc, lc = h[start:end].to(cd), labels[start:end, None]
        if low:
            logits_cd = buf_cd[: end - start]
            if via_fp32:  # rounded to cd, as the 16-bit product is
                product_into(logits_cd, upcast_to_scratch(hc, "gemm/x"), w, b32)
            else:
                _mm_out(logits_cd, hc, w, b)
            logits = buf_acc[: end - start].copy_(logits_cd)
        else:
            logits = linear_nt(hc, w, b) if buf_acc is None else _mm_out(buf_acc[: end - start], hc, w, b)
        row_loss = _softmax_(logits, lc, hc, w, b)
        probs = logits
        vc = None if valid is None else valid[start:end]
        loss = loss + (row_loss.sum() if vc is None else torch.where(vc, row_loss, 0.0).sum())
        if not (want_h or want_w or want_b):
            continue
        probs.scatter_add_(1, lc, torch.full_like(lc, -1, dtype=acc))  # softmax - onehot
        if vc is not None:
            probs.mul_(vc[:, None])
        if want_b:
            grad_b.add_(probs.sum(0))
        p = logits_cd.copy_(probs) if low else probs
        del logits, probs
        if want_h:
            if via_fp32:  # p upcast into the fp32 buffer, which is free again
                product_into(grad_h[start:end], buf_acc[: end - start].copy_(p), w.t())
            elif low or fp32_into_buffer:
                torch.mm(p, w, out=grad_h[start:end])
            else:
                grad_h[start:end] = linear_nt(p, w.t())
        if want_w:
            grad_w.add_(torch.mm(p.t(), hc))
    return loss, grad_h, grad_w, grad_b


def _mm_out(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


# Below this probability of the target the loss is not taken as -log(p): exp() nears the
# subnormal range there and loses relative precision; those rows get an exact logsumexp.
_TINY_PROB = 2.0**-100


def _softmax_(logits: Tensor, lc: Tensor, hc: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Turn fp32 `logits` [n, V] into their softmax in place; return the row losses [n]
    (logsumexp - target logit) for targets lc [n, 1]. hc, w, b recompute rare rows exactly."""
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        # torch's fused softmax kernel, in place (it reads a row before writing it): ~2x faster
        # on CPU than max / sub / exp / sum / div as five passes. loss = -log p[target], with
        # the rows whose p underflows recomputed from their logits (data-dependent: eager only).
        torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        p_target = logits.gather(1, lc).squeeze(1)
        row_loss = p_target.log().neg_()
        tiny = (p_target < _TINY_PROB).nonzero().squeeze(1)
        if tiny.numel():
            exact = linear_nt(hc.index_select(0, tiny), w, b).to(logits.dtype)
            row_loss[tiny] = exact.logsumexp(1) - exact.gather(1, lc.index_select(0, tiny)).squeeze(1)
        return row_loss
    # logsumexp by hand, turning the logits into exp(logits - max) in place: one exp pass and
    # no chunk-sized temporary, and the softmax is a division away.
    target = logits.gather(1, lc).squeeze(1)
    row_max = logits.amax(1, keepdim=True)
    sum_exp = logits.sub_(row_max).exp_().sum(1, keepdim=True)
    logits.div_(sum_exp)
    return (row_max + sum_exp.log()).squeeze(1) - target


def _scale_rows(g: Tensor, scale: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """g * scale rounded once to `dtype`: the product is formed in fp32 (chunk by chunk, to
    bound the temporary) so a scale like 1/n_tokens is not first rounded to bf16."""
    if g.dtype == scale.dtype == dtype:
        return g * scale
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    for start in range(0, g.shape[0], rows):
        out[start : start + rows] = g[start : start + rows].to(scale.dtype) * scale
    return out


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, idx, rows, mean, cd):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        h = hidden if idx is None else hidden.index_select(0, idx)
        w, b = weight.to(cd), None if bias is None else bias.to(cd)
        loss, grad_h, grad_w, grad_b = _chunk_pass(h, w, b, labels, valid, rows, cd, want_h, want_w, want_b)
        del h, w, b
        denom = _count(labels, valid, loss) if mean else None
        ctx.save_for_backward(grad_h, grad_w, grad_b, idx, denom)
        ctx.rows, ctx.hidden_shape = rows, hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss / denom if mean else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b, idx, denom = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_loss.to(torch.promote_types(grad_loss.dtype, torch.float32))
        if denom is not None:
            scale = scale / denom
        grad_hidden = grad_weight = grad_bias = None
        if grad_h is not None:
            scaled = _scale_rows(grad_h, scale, h_dtype, ctx.rows)
            if idx is None:
                grad_hidden = scaled
            else:
                grad_hidden = torch.zeros(ctx.hidden_shape, dtype=h_dtype, device=scaled.device)
                grad_hidden.index_copy_(0, idx, scaled)
        if grad_w is not None:
            grad_weight = (grad_w * scale).to(w_dtype)
        if grad_b is not None:
            grad_bias = (grad_b * scale).to(b_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _count(labels: Tensor, valid: Tensor | None, like: Tensor) -> Tensor:
    # labels are already filtered to the counted rows unless a mask is carried
    n = valid.sum() if valid is not None else torch.tensor(labels.shape[0], device=like.device)
    return n.to(like.dtype)


def _lce_torch(hidden, weight, labels, bias, ignore_index, chunk_size, reduction):
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    labels = labels.long()
    valid = labels != ignore_index
    idx = None
    if torch.compiler.is_compiling():
        # Static shapes: compute every row, mask the ignored ones (given a safe label).
        labels = labels.masked_fill(~valid, 0)
    else:
        bad = valid & ((labels < 0) | (labels >= vocab))
        n_valid, n_bad = (int(v) for v in torch.stack([valid.sum(), bad.sum()]).tolist())
        if n_bad:
            shown = labels[bad][:5].tolist()
            raise ValueError(
                f"linear_cross_entropy: {n_bad} labels are outside [0, {vocab}) and are not "
                f"ignore_index={ignore_index} (first: {shown})"
            )
        if n_valid < n_rows:
            idx = valid.nonzero().squeeze(1)
            labels = labels.index_select(0, idx)
        valid = None
    rows = chunk_size or auto_chunk_rows(vocab, labels.shape[0])
    cd = compute_dtype(hidden)
    mean = reduction == "mean"
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearCrossEntropyFn.apply(hidden, weight, bias, labels, valid, idx, rows, mean, cd)
    h = hidden if idx is None else hidden.index_select(0, idx)
    w, b = weight.to(cd), None if bias is None else bias.to(cd)
    loss = _chunk_pass(h, w, b, labels, valid, rows, cd, False, False, False)[0]
    return loss / _count(labels, valid, loss) if mean else loss


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "sum",
) -> Tensor:
    """Cross-entropy of logits = hidden @ weightᵀ + bias against labels, without forming them.

    hidden: [N, H]; weight: [V, H] (the lm_head); labels: [N] ints in [0, V) or ignore_index;
    bias: [V] or None. Logits are computed in hidden's dtype (the autocast dtype under
    autocast) and upcast to fp32 per chunk of `chunk_size` rows (None: `auto_chunk_rows`).
    Returns a 0-d fp32 tensor: the summed loss, or its mean over non-ignored rows (NaN when
    every row is ignored, as F.cross_entropy). Gradients flow to hidden, weight and bias only
    where they require grad. With fast paths disabled this runs the reference.
    """
    _check_args("linear_cross_entropy", hidden, weight, labels, bias, chunk_size, reduction, ndim=2)
    impl = select("linear_cross_entropy", _lce_torch, _reference)
    return impl(hidden, weight, labels, bias, ignore_index, chunk_size, reduction)


def linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "sum",
) -> Tensor:
    """`linear_cross_entropy` as F.linear + F.cross_entropy on the full fp32 logits
    (`chunk_size` is accepted for a matching signature and ignored)."""
    _check_args("linear_cross_entropy_reference", hidden, weight, labels, bias, chunk_size, reduction, ndim=2)
    return _reference(hidden, weight, labels, bias, ignore_index, chunk_size, reduction)


def _reference(hidden, weight, labels, bias, ignore_index, chunk_size, reduction):
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction=reduction)


def _shift_labels(labels: Tensor, ignore_index: int) -> Tensor:
    # Position t predicts token t+1; the last position has no target. Padding the labels
    # (rather than slicing hidden) keeps hidden's memory as is: no [B, T-1, H] copy.
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Next-token loss of a causal LM from its final hidden states, transformers' shift.

    hidden: [B, T, H]; labels: [B, T] (unshifted, as passed to a HF causal LM); weight/bias:
    the lm_head. Returns (loss_sum fp32 0-d, n_target_tokens int64 0-d): divide the sum of
    loss_sum over a gradient-accumulation window by the sum of n_target_tokens.
    """
    _check_args("causal_lm_loss", hidden, weight, labels, bias, chunk_size, "sum", ndim=3)
    shifted = _shift_labels(labels.long(), ignore_index)
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1), bias, ignore_index, chunk_size, "sum"
    )
    return loss, (shifted != ignore_index).sum()


def causal_lm_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`causal_lm_loss` the way transformers computes it: full fp32 logits, sliced shift."""
    _check_args("causal_lm_loss_reference", hidden, weight, labels, bias, chunk_size, "sum", ndim=3)
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).long()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss, (shift_labels != ignore_index).sum()
