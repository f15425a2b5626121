"""kernels.attention (per-batch GEMMs, probabilities kept) against the plain eager composition."""
from __future__ import annotations

import pytest
import torch

from peftkit.kernels import fast_paths
from peftkit.kernels.attention import attention, attention_reference, causal_bias


def qkv(batch=2, heads=3, q_len=9, kv_len=9, dim=8, dtype=torch.float32, transformers_layout=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(seq):
        if transformers_layout:  # [B, S, H, D] memory seen as [B, H, S, D], as transformers hands it over
            t = torch.randn(batch, seq, heads, dim, generator=g).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, seq, dim, generator=g)
        return t.to(dtype).requires_grad_()

    return make(q_len), make(kv_len), make(kv_len)


def bias_of(kind, batch, heads, q_len, kv_len, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "causal":
        return causal_bias(q_len, kv_len, dtype, torch.device("cpu"))[None, None]
    if kind == "padding":  # per batch element, shared by heads
        keep = torch.rand(batch, 1, q_len, kv_len, generator=g) > 0.3
        keep[..., 0] = True
        return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)
    if kind == "per-head":  # an arbitrary additive float bias
        return torch.randn(1, heads, q_len, kv_len, generator=g).to(dtype)
    raise ValueError(kind)


def run(fast, q, k, v, bias, scale=None, seed=2):
    grad = torch.randn(q.shape[:3] + (v.shape[3],), generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    for t in (q, k, v):
        t.grad = None
    with fast_paths(fast):
        out = attention(q, k, v, bias, scale)
    out.backward(grad)
    return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", [None, "causal", "padding", "per-head"])
@pytest.mark.parametrize("layout", [True, False])
def test_fast_equals_reference_fp32(kind, layout):
    q, k, v = qkv(transformers_layout=layout)
    bias = bias_of(kind, 2, 3, 9, 9, torch.float32)
    fast, ref = run(True, q, k, v, bias), run(False, q, k, v, bias)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_cross_attention_lengths_and_scale():
    q, k, v = qkv(q_len=5, kv_len=12, dim=6)
    bias = bias_of("per-head", 2, 3, 5, 12, torch.float32)
    fast, ref = run(True, q, k, v, bias, scale=0.3), run(False, q, k, v, bias, scale=0.3)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reference_is_softmax_attention():
    """The reference itself against the textbook formula in float64."""
    q, k, v = qkv(dtype=torch.float64)
    bias = bias_of("causal", 2, 3, 9, 9, torch.float64)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias, -1) @ v
    torch.testing.assert_close(attention_reference(q, k, v, bias), expected)


@pytest.mark.parametrize("kind", ["causal", "padding"])
def test_bf16_within_bf16_rounding(kind):
    """bf16 fast path against float64 math on the same (bf16-valued) inputs: the error is of
    the size bf16 rounding gives (scores and probabilities rounded to bf16, as eager does)."""
    q, k, v = qkv(batch=2, heads=4, q_len=64, kv_len=64, dim=16, dtype=torch.bfloat16)
    bias = bias_of(kind, 2, 4, 64, 64, torch.bfloat16)
    fast = run(True, q, k, v, bias)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = run(False, q64, k64, v64, bias.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, exact):
        assert max_rel(a, b.float()) < 3e-2, name
    eager = run(False, q, k, v, bias)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, eager):
        assert max_rel(a, b) < 3e-2, name


def test_output_is_written_in_the_layout_the_output_projection_reads():
    q, k, v = qkv()
    out = attention(q, k, v, None)
    assert out.shape == (2, 3, 9, 8)
    assert out.transpose(1, 2).is_contiguous()  # [B, S, H, D] memory: o_proj's input needs no copy


def test_fully_masked_row_is_finite():
    """A padded query row that may see no key gives a finite output (eager's convention), not NaN."""
    q, k, v = qkv(batch=1, heads=2, q_len=4, kv_len=4)
    bias = torch.zeros(1, 1, 4, 4)
    bias[0, 0, 0] = torch.finfo(torch.float32).min
    out, dq, dk, dv = run(True, q, k, v, bias)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


def test_causal_bias():
    b = causal_bias(3, 5, torch.bfloat16, torch.device("cpu"))
    lowest = torch.finfo(torch.bfloat16).min
    expected = torch.tensor([[0, 0, 0, lowest, lowest], [0, 0, 0, 0, lowest], [0, 0, 0, 0, 0]], dtype=torch.bfloat16)
    assert torch.equal(b, expected)


def test_bad_arguments_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q \(2, 3, 9, 8\), k \(2, 3, 9, 7\)"):
        attention(q, k[..., :7], v)
    with pytest.raises(ValueError, match=r"bias must be \[1 or batch, 1 or heads, 9, 9\], got \(2, 3, 9\)"):
        attention(q, k, v, torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="4-D floating-point"):
        attention(q[0], k, v)


def test_ops_pass_opcheck():
    """The custom ops' fake (meta) versions, schemas and autograd registration agree with the
    real ones (what torch.compile relies on)."""
    from peftkit.kernels.attention import _attention_backward, _attention_forward

    q, k, v = qkv(dtype=torch.bfloat16)
    bias = bias_of("padding", 2, 3, 9, 9, torch.bfloat16)
    torch.library.opcheck(_attention_forward, (q, k, v, bias, 0.3))
    torch.library.opcheck(_attention_forward, (q, k, v, None, 0.3))
    out, probs = _attention_forward(q.detach(), k.detach(), v.detach(), bias, 0.3)
    torch.library.opcheck(_attention_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), probs, 0.3))
