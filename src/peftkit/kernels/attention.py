"""Attention for short sequences, forward and backward as two ops: softmax(q kᵀ · scale + bias) v.

torch's CPU `scaled_dot_product_attention` (a flash kernel) runs at ~40 GFLOP/s on head_dim 64
and recomputes the scores in backward; at training lengths of a few hundred tokens the
probabilities are small enough to keep, and the six products then run as large bf16 GEMMs.
Measured on one core, bf16, [4, 8, 256, 64], forward + backward: 23.3 ms for SDPA, 12.2 ms
here (benchmarks/kernels_micro.py); at 1024 keys it is slower than SDPA.

- The products run per batch element on [heads, seq, head_dim] views, so q, k and v are used
  in the layout transformers produces ([B, S, H, D] memory seen as [B, H, S, D]) without a
  copy, and the output is written in that layout (what the model's o_proj reads).
- Scores are rounded to the input dtype before the softmax, as transformers' eager attention
  does; SDPA keeps them in fp32. The softmax itself accumulates in fp32.
- Saved for backward: q, k, v (views of tensors autograd keeps anyway) and the probabilities,
  [B, H, Sq, Skv] in the input dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import select

__all__ = ["attention", "attention_reference", "causal_bias"]

_BIAS_CACHE: dict[tuple, Tensor] = {}


def causal_bias(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[q_len, kv_len] additive mask: 0 where query i may see key j (j <= i + kv_len - q_len),
    the dtype's lowest finite value elsewhere (finite, so a fully masked row cannot give NaN)."""
    if torch.compiler.is_compiling():  # traced: built in the graph (no module-level cache)
        return _causal_bias(q_len, kv_len, dtype, device)
    key = (q_len, kv_len, dtype, device)
    bias = _BIAS_CACHE.get(key)
    if bias is None:
        bias = _causal_bias(q_len, kv_len, dtype, device)
        if len(_BIAS_CACHE) > 16:
            _BIAS_CACHE.clear()
        _BIAS_CACHE[key] = bias
    return bias


def _causal_bias(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((q_len, kv_len), torch.finfo(dtype).min, dtype=dtype, device=device).triu(kv_len - q_len + 1)


def _check_args(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> None:
    problems = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            problems.append(f"{name} must be a 4-D floating-point tensor [batch, heads, seq, head_dim]")
    if not problems:
        if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            problems.append(
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit: q and k need the same "
                "batch, heads and head_dim, k and v the same batch, heads and seq (repeat grouped k/v heads first)"
            )
        if len({q.dtype, k.dtype, v.dtype}) != 1:
            problems.append(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if bias is not None:
            target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            ok = bias.dim() == 4 and all(b in (1, t) for b, t in zip(bias.shape, target)) and bias.shape[2:] == target[2:]
            if not ok:
                problems.append(f"bias must be [1 or batch, 1 or heads, {target[2]}, {target[3]}], got {tuple(bias.shape)}")
    if problems:
        raise ValueError("attention: " + "; ".join(problems))


def attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The plain composition (transformers' eager attention): [B, H, Sq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# The kernel is a pair of custom ops with a registered backward: eager calls cost one dispatch
# each, and under torch.compile both are opaque nodes (the per-batch loops write into slices
# of preallocated outputs, which inductor would not keep).
@torch.library.custom_op("peftkit::attention_forward", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(output [B, H, Sq, Dv] as a view of [B, Sq, H, Dv] memory, probabilities [B, H, Sq, Skv])."""
    batch, heads, q_len, _ = q.shape
    kv_len, v_dim = k.shape[2], v.shape[3]
    scores = q.new_empty(batch, heads, q_len, kv_len)
    for b in range(batch):
        if bias is None:
            torch.bmm(q[b], k[b].transpose(1, 2), out=scores[b])
            scores[b].mul_(scale)
        else:
            bias_b = bias[b if bias.shape[0] > 1 else 0].expand(heads, q_len, kv_len)
            torch.baddbmm(bias_b, q[b], k[b].transpose(1, 2), alpha=scale, out=scores[b])
    probs = torch.softmax(scores, dim=-1)
    del scores
    out = q.new_empty(batch, q_len, heads, v_dim)  # the layout the output projection reads
    for b in range(batch):
        torch.bmm(probs[b], v[b], out=out[b].transpose(0, 1))
    return out.transpose(1, 2), probs


@_attention_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_len, heads, v.shape[3]).transpose(1, 2)
    return out, q.new_empty(batch, heads, q_len, k.shape[2])


@torch.library.custom_op("peftkit::attention_backward", mutates_args=())
def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # Gradients in their inputs' memory layout, so the views above them pass them on uncopied.
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    dprobs = torch.empty_like(probs)
    for b in range(q.shape[0]):
        torch.bmm(probs[b].transpose(1, 2), grad_out[b], out=dv[b])
        torch.bmm(grad_out[b], v[b].transpose(1, 2), out=dprobs[b])
    dscores = torch._softmax_backward_data(dprobs, probs, -1, probs.dtype)
    del dprobs
    for b in range(q.shape[0]):
        torch.bmm(dscores[b], k[b], out=dq[b])
        torch.bmm(dscores[b].transpose(1, 2), q[b], out=dk[b])
    return dq.mul_(scale), dk.mul_(scale), dv


@_attention_backward.register_fake
def _(grad_out, q, k, v, probs, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_probs):
    q, k, v, probs = ctx.saved_tensors
    dq, dk, dv = _attention_backward(grad_out, q, k, v, probs, ctx.scale)
    return dq, dk, dv, None, None


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _attention_torch(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    return _attention_forward(q, k, v, bias, scale)[0]


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale + bias) v for q [B, H, Sq, D], k [B, H, Skv, D], v [B, H, Skv, Dv].

    `bias` is an additive mask [1 or B, 1 or H, Sq, Skv] in the input dtype (see
    `causal_bias`); `scale` defaults to D^-0.5. Returns [B, H, Sq, Dv] (the fast path's is a
    view of a [B, Sq, H, Dv] tensor). No dropout; grouped k/v heads must be repeated first.
    """
    _check_args(q, k, v, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    impl = select("attention", _attention_torch, attention_reference)
    return impl(q, k, v, bias, scale)
