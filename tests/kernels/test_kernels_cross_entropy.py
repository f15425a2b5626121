"""linear_cross_entropy / causal_lm_loss (chunked, fused) against the full-logits references."""
from __future__ import annotations

import pytest
import torch

from peftkit.kernels import (
    auto_chunk_rows,
    causal_lm_loss,
    causal_lm_loss_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

N, H, V = 37, 16, 50


def make(n=N, dtype=torch.float32, bias=False, weight_grad=True, hidden_grad=True, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_(hidden_grad)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (n,), generator=g)
    labels[list(ignored)] = -100
    return hidden, weight, labels, b


def run(fn, hidden, weight, labels, b, grad_scale=1.7, **kw):
    leaves = [hidden, weight, b]
    for t in leaves:
        if t is not None:
            t.grad = None
    loss = fn(hidden, weight, labels, b, **kw)
    if loss.requires_grad:
        (loss * grad_scale).backward()
    return [loss.detach()] + [None if t is None or t.grad is None else t.grad.clone() for t in leaves]


def assert_all_close(got, want, atol=1e-5, rtol=1e-5):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"item {i}: expected no gradient"
            continue
        assert a is not None, f"item {i}: missing gradient"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"item {i}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 64, None])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_reference(chunk_size, reduction, bias):
    # 37 rows: no chunk size but 1 divides them; rows 8..15 form an all-ignored chunk at size 8
    args = make(bias=bias, ignored=[0, 5, *range(8, 16), 36])
    fast = run(linear_cross_entropy, *args, chunk_size=chunk_size, reduction=reduction)
    ref = run(linear_cross_entropy_reference, *args, reduction=reduction)
    assert fast[0].dtype == torch.float32 and fast[0].dim() == 0
    assert_all_close(fast, ref)
    assert fast[1][8:16].abs().max() == 0  # ignored rows get no gradient


def test_no_ignored_rows():
    args = make(bias=True)
    assert_all_close(run(linear_cross_entropy, *args, chunk_size=10), run(linear_cross_entropy_reference, *args))


def test_custom_ignore_index():
    hidden, weight, labels, _ = make()
    labels[:4] = 3  # a real class id used as the ignore value
    fast = run(linear_cross_entropy, hidden, weight, labels, None, ignore_index=3, chunk_size=5)
    ref = run(linear_cross_entropy_reference, hidden, weight, labels, None, ignore_index=3)
    assert_all_close(fast, ref)


def test_every_row_ignored():
    args = make(ignored=range(N), bias=True)
    fast = run(linear_cross_entropy, *args, chunk_size=8)
    assert fast[0] == 0
    assert all(g.abs().max() == 0 for g in fast[1:])
    # mean over zero tokens is NaN, as in F.cross_entropy
    assert torch.isnan(linear_cross_entropy(*args, reduction="mean"))
    assert torch.isnan(linear_cross_entropy_reference(*args, reduction="mean"))


def test_gradients_only_where_required():
    hidden, weight, labels, _ = make(weight_grad=False, ignored=[1, 2])
    fast = run(linear_cross_entropy, hidden, weight, labels, None, chunk_size=7)
    assert fast[2] is None
    assert_all_close(fast, run(linear_cross_entropy_reference, hidden, weight, labels, None))
    hidden, weight, labels, _ = make(hidden_grad=False)
    fast = run(linear_cross_entropy, hidden, weight, labels, None, chunk_size=7)
    assert fast[1] is None
    assert_all_close(fast, run(linear_cross_entropy_reference, hidden, weight, labels, None))


def test_no_grad_forward():
    hidden, weight, labels, b = make(bias=True, ignored=[3])
    with torch.no_grad():
        fast = linear_cross_entropy(hidden, weight, labels, b, chunk_size=4, reduction="mean")
        ref = linear_cross_entropy_reference(hidden, weight, labels, b, reduction="mean")
    assert not fast.requires_grad
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def _truth(args, **kw):
    up = [t if t is None or not t.is_floating_point() else t.detach().float().requires_grad_(t.requires_grad) for t in args]
    return run(linear_cross_entropy_reference, *up, **kw)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bf16_no_less_accurate_than_reference(reduction):
    # Logits come out of a bf16 matmul (8 significant bits) in both implementations and the
    # softmax gradient is rounded to bf16 before the gradient matmuls: each sits a few bf16
    # ulps from the fp32 computation on the same values. The fused path must not be worse.
    args = make(n=64, dtype=torch.bfloat16, bias=True, ignored=[0, 9])
    fast = run(linear_cross_entropy, *args, chunk_size=24, reduction=reduction)
    ref = run(linear_cross_entropy_reference, *args, reduction=reduction)
    truth = _truth(args, reduction=reduction)
    assert fast[0].dtype == torch.float32
    for i, (f, r, t) in enumerate(zip(fast, ref, truth)):
        assert f.dtype == r.dtype, i
        scale = t.abs().max().item()
        fast_err, ref_err = (f.float() - t).abs().max().item(), (r.float() - t).abs().max().item()
        assert fast_err <= 2**-6 * scale, (i, fast_err, scale)
        assert fast_err <= 2 * ref_err + 2**-9 * scale, (i, fast_err, ref_err)


def test_autocast_bf16():
    args = make(bias=True, ignored=[4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run(linear_cross_entropy, *args, chunk_size=16)
        ref = run(linear_cross_entropy_reference, *args)
    truth = run(linear_cross_entropy_reference, *args)
    assert fast[0].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in fast[1:])
    for f, r, t in zip(fast, ref, truth):
        scale = t.abs().max().item()
        assert (f - t).abs().max().item() <= 2**-6 * scale
        assert (f - r).abs().max().item() <= 2**-6 * scale


def test_traces_without_graph_breaks_masking_ignored_rows():
    # Under torch.compile ignored rows are masked, not filtered: the all-ignored chunk included.
    hidden, weight, labels, b = make(bias=True, ignored=range(8, 16))
    compiled = torch.compile(
        lambda h, w, lab, bb: linear_cross_entropy(h, w, lab, bb, chunk_size=8, reduction="mean"),
        backend="aot_eager",
        fullgraph=True,
    )
    fast = run(compiled, hidden, weight, labels, b)
    assert_all_close(fast, run(linear_cross_entropy_reference, hidden, weight, labels, b, reduction="mean"))


def test_keeps_no_logits_for_backward():
    hidden, weight, labels, _ = make(n=128, weight_grad=False, ignored=range(0, 128, 2))
    weight = torch.randn(4000, H)
    labels = torch.randint(0, 4000, (128,))
    labels[::2] = -100
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(hidden, weight, labels, chunk_size=32)
    # grad wrt the 64 counted rows (fp32) and their int64 indices; the logits would be 2 MB
    assert sum(seen.values()) == 64 * H * 4 + 64 * 8


def test_auto_chunk_rows():
    assert auto_chunk_rows(32000, 10_000) == 256  # 32 MiB of fp32 logits
    assert auto_chunk_rows(128_256, 10_000) == 64
    assert auto_chunk_rows(128, 37) == 37
    assert auto_chunk_rows(10**9, 5) == 1
    assert auto_chunk_rows(32000, 0) == 1


def test_bad_arguments():
    hidden, weight, labels, _ = make()
    with pytest.raises(ValueError) as err:
        linear_cross_entropy(hidden, weight[:, :-1], labels[:-1].float(), torch.zeros(3), chunk_size=0, reduction="avg")
    msg = str(err.value)
    for part in ("does not match hidden size 16", "labels must be an integer tensor", "bias must be None or a [50]",
                 "chunk_size must be None", "reduction must be one of ['sum', 'mean'], got 'avg'"):
        assert part in msg, part
    with pytest.raises(ValueError, match=r"labels must have shape \[37\]"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    bad = labels.clone()
    bad[3], bad[7] = V, -5
    with pytest.raises(ValueError, match=r"2 labels are outside \[0, 50\) and are not ignore_index=-100 \(first: \[50, -5\]\)"):
        linear_cross_entropy(hidden, weight, bad)


# --- causal LM wrapper -----------------------------------------------------------------------


def test_causal_lm_loss_matches_shifted_reference_and_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (3, 9), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 6:] = -100  # padding

    loss, n = causal_lm_loss(hidden, weight, labels, chunk_size=5)
    loss.backward()
    got = [loss.detach(), hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    ref_loss, ref_n = causal_lm_loss_reference(hidden, weight, labels)
    ref_loss.backward()
    assert n.item() == ref_n.item() == (labels[:, 1:] != -100).sum().item()
    assert_all_close(got, [ref_loss.detach(), hidden.grad, weight.grad])

    hf = ForCausalLMLoss(hidden.detach() @ weight.detach().t(), labels, V)  # mean over targets
    torch.testing.assert_close(loss.detach() / n, hf, atol=1e-6, rtol=1e-6)


def test_causal_lm_loss_shapes_checked():
    with pytest.raises(ValueError, match=r"labels must have shape \[2, 5\]"):
        causal_lm_loss(torch.randn(2, 5, H), torch.randn(V, H), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden must be a floating-point \[B, T, H\]"):
        causal_lm_loss(torch.randn(10, H), torch.randn(V, H), torch.zeros(10, dtype=torch.long))


def _loss_and_grads(h, w, b, labels, dtype):
    hd, wd, bd = (t.detach().to(dtype).requires_grad_() for t in (h, w, b))
    loss = linear_cross_entropy(hd, wd, labels, bias=bd, chunk_size=24)
    loss.backward()
    return loss, hd.grad, wd.grad, bd.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_pass_buffers_change_no_bit(monkeypatch, dtype):
    """bf16 without native GEMMs: logits and the hidden-state gradient written by `product_into`
    into the pass's buffers equal the earlier route (`linear_nt`'s fp32 product, rounded, copied
    in); fp32 on a CPU without oneDNN: `mm(out=)` into the pass's buffer equals a fresh product."""
    from peftkit.kernels import _gemm
    from peftkit.kernels import cross_entropy as ce

    monkeypatch.setattr(_gemm, "native_16bit_gemm", lambda d: False)
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(70, 48, generator=g), torch.randn(300, 48, generator=g) / 7
    b, labels = torch.randn(300, generator=g), torch.randint(0, 300, (70,), generator=g)
    got = _loss_and_grads(h, w, b, labels, dtype)
    if dtype == torch.bfloat16:  # the earlier route: fresh 16-bit products from linear_nt
        def earlier(out, x32, weight, bias32=None):
            return out.copy_(_gemm.linear_nt(x32.to(weight.dtype), weight, None if bias32 is None else
                                             bias32.to(weight.dtype)))
        monkeypatch.setattr(ce, "product_into", earlier)
        monkeypatch.setattr(ce, "upcast_to_scratch", lambda t, slot: t.float())
    else:  # the oneDNN-side branch: linear_nt's new tensor (torch.mm here)
        monkeypatch.setattr(ce, "onednn_fp32_available", lambda: True)
    want = _loss_and_grads(h, w, b, labels, dtype)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
