"""lora_linear (fused autograd) against lora_linear_reference (plain F.linear, as peft composes it)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peftkit.kernels import dropout_keep_mask, lora_linear, lora_linear_reference

lora_linear_module = importlib.import_module("peftkit.kernels.lora_linear")  # the package re-exports the function

IN, OUT, R = 24, 40, 4


def make(lead=(6,), dtype=torch.float32, bias=False, fan_in_fan_out=False, x_grad=True, bias_grad=True, seed=0):
    """Inputs at unit scale (so absolute tolerances mean relative ones); A, B fp32 masters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, IN, generator=g).to(dtype).requires_grad_(x_grad)
    w = torch.randn(OUT, IN, generator=g) / IN**0.5
    w = (w.t().contiguous() if fan_in_fan_out else w).to(dtype)
    b = (torch.randn(OUT, generator=g).to(dtype).requires_grad_(bias_grad)) if bias else None
    A = (torch.randn(R, IN, generator=g) / IN**0.5).requires_grad_()
    B = (torch.randn(OUT, R, generator=g) / R**0.5).requires_grad_()
    grad_out = torch.randn(*lead, OUT, generator=g).to(dtype)
    return x, w, b, A, B, grad_out


def run(fn, x, w, b, A, B, grad_out, **kw):
    """Output and gradients (None where an input gets none) of one forward+backward."""
    leaves = [x, w, b, A, B]
    for t in leaves:
        if t is not None:
            t.grad = None
    y = fn(x, w, b, A, B, kw.pop("scaling", 1.5), **kw)
    y.backward(grad_out)
    return [y.detach()] + [None if t is None or t.grad is None else t.grad.clone() for t in leaves]


def assert_all_close(got, want, atol, rtol=0.0):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"item {i}: expected no gradient"
            continue
        assert a is not None and a.dtype == b.dtype and a.shape == b.shape, f"item {i}"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"item {i}: {m}")


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fp32_matches_reference(lead, bias, fan_in_fan_out):
    args = make(lead, bias=bias, fan_in_fan_out=fan_in_fan_out)
    fast = run(lora_linear, *args, fan_in_fan_out=fan_in_fan_out)
    ref = run(lora_linear_reference, *args, fan_in_fan_out=fan_in_fan_out)
    assert fast[0].shape == (*lead, OUT)
    assert fast[2] is None  # the frozen weight gets no gradient
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_trainable_weight_gets_its_gradient(fan_in_fan_out):
    x, w, b, A, B, g = make((3, 4), bias=True, fan_in_fan_out=fan_in_fan_out)
    w.requires_grad_()
    fast = run(lora_linear, x, w, b, A, B, g, fan_in_fan_out=fan_in_fan_out)
    ref = run(lora_linear_reference, x, w, b, A, B, g, fan_in_fan_out=fan_in_fan_out)
    assert fast[2].shape == w.shape
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_input_without_grad_skips_grad_x():
    args = make((9,), bias=True, x_grad=False, bias_grad=False)
    fast = run(lora_linear, *args)
    ref = run(lora_linear_reference, *args)
    assert fast[1] is None and fast[3] is None
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-5)


def _truth_fp32(args, **kw):
    """The same computation in fp32 on the very (bf16-rounded) input values."""
    up = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in args]
    out = run(lora_linear_reference, *up, **kw)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_base_with_fp32_masters(bias):
    # bf16 keeps 8 significant bits: each output/gradient element is a sum rounded to bf16, so
    # both implementations sit within a few bf16 ulps (2^-8 relative, ~0.4%) of the fp32 truth;
    # the fused one may round differently but must not be less accurate than the reference.
    args = make((4, 16), dtype=torch.bfloat16, bias=bias)
    fast = run(lora_linear, *args)
    ref = run(lora_linear_reference, *args)
    truth = _truth_fp32(args)
    assert fast[0].dtype == torch.bfloat16
    assert fast[4].dtype == fast[5].dtype == torch.float32  # masters keep fp32 gradients
    for i, (f, r, t) in enumerate(zip(fast, ref, truth)):
        if t is None:
            assert f is None and r is None
            continue
        assert f.dtype == r.dtype, i
        scale = t.abs().max().item()
        fast_err = (f.float() - t).abs().max().item()
        ref_err = (r.float() - t).abs().max().item()
        assert fast_err <= 2 ** -6 * scale, (i, fast_err, scale)
        assert fast_err <= 2 * ref_err + 2 ** -9 * scale, (i, fast_err, ref_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_masters_keep_the_branch_in_fp32_as_peft(dtype):
    # peft casts x to lora_A's dtype: with fp32 masters the branch and A's and B's gradients are
    # fp32 computations on the (exactly upcast) low-precision x, the sum is rounded once. The
    # reference is that composition; the fused op must be as precise on every output.
    args = make((4, 16), dtype=dtype, bias=True)
    fast = run(lora_linear, *args)
    ref = run(lora_linear_reference, *args)
    truth = _truth_fp32(args)
    torch.testing.assert_close(fast[0], ref[0], atol=0, rtol=0)  # both: base rounded, + fp32 branch, rounded
    for i in (4, 5):  # A, B: fp32 arithmetic, only the order of its roundings differs
        assert (fast[i] - truth[i]).abs().max() <= 1e-5 * truth[i].abs().max(), i
    # dL/dx: peft rounds the base part, the branch part and their sum; the fused op the sum only
    assert (fast[1].float() - truth[1]).abs().mean() <= (ref[1].float() - truth[1]).abs().mean()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_wide_branch_in_row_blocks_matches_one_block(monkeypatch, fan_in_fan_out):
    # The fp32 branch on a bf16 base works through its fp32 temporaries a block of rows at a
    # time; blocks of 4 rows (and a 2-row tail: 42 rows) must give the one-block result, the
    # dropout mask's bytes included.
    args = make((6, 7), dtype=torch.bfloat16, bias=True, fan_in_fan_out=fan_in_fan_out)
    kw = dict(dropout_p=P, training=True, dropout_seed=5, fan_in_fan_out=fan_in_fan_out)
    whole = run(lora_linear, *args, **kw)
    monkeypatch.setattr(lora_linear_module, "WIDE_BLOCK_BYTES", 4 * IN * 4)
    assert len(list(lora_linear_module._blocks(42, IN, torch.float32))) == 11
    blocked = run(lora_linear, *args, **kw)
    assert_all_close(blocked, whole, atol=1e-5, rtol=1e-5)  # fp32 sums over blocks, in another order
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])


def test_autocast_bf16_behaves_like_autocast_linear():
    x, w, b, A, B, g = make((3, 8), bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run(lora_linear, x, w, b, A, B, g)
        ref = run(lora_linear_reference, x, w, b, A, B, g)
    assert fast[0].dtype == ref[0].dtype == torch.bfloat16
    # gradients come back in each leaf's own dtype (fp32 here), as autocast's casts give them
    assert all(t.dtype == torch.float32 for t in fast[1:] if t is not None)
    truth = run(lora_linear_reference, x, w, b, A, B, g)  # fp32, no autocast
    for i, (f, r, t) in enumerate(zip(fast, ref, truth)):
        if t is None:
            continue
        scale = t.abs().max().item()
        assert (f.float() - t).abs().max().item() <= 2 ** -6 * scale, i
        assert (f.float() - r.float()).abs().max().item() <= 2 ** -6 * scale, i


# --- dropout ---------------------------------------------------------------------------------

P = 0.3


def test_dropout_matches_reference_with_the_same_mask():
    args = make((5, 6), bias=True)
    fast = run(lora_linear, *args, dropout_p=P, training=True, dropout_seed=1234)
    ref = run(lora_linear_reference, *args, dropout_p=P, training=True, dropout_seed=1234)
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_reference_draws_the_fused_mask_under_the_same_manual_seed():
    # With fast paths off a run must see the masks it sees with them on: both draw the seed from
    # torch's generator the same way and use the same counter-based mask.
    args = make((5, 6), bias=True)
    torch.manual_seed(11)
    fast = run(lora_linear, *args, dropout_p=P, training=True)
    torch.manual_seed(11)
    ref = run(lora_linear_reference, *args, dropout_p=P, training=True)
    assert_all_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(run(lora_linear_reference, *args, dropout_p=P, training=True)[0], ref[0])


def test_dropout_output_and_grads_follow_the_seeded_mask():
    x, w, b, A, B, g = make((30,))
    s, seed = 1.5, 99
    fast = run(lora_linear, x, w, b, A, B, g, scaling=s, dropout_p=P, training=True, dropout_seed=seed)
    keep = dropout_keep_mask(seed, (30, IN), P, "cpu").float()
    assert 0 < keep.mean().item() < 1
    TOL = 3e-5  # the hand formulas associate products differently; values are O(1)-O(10)
    xd = x.detach() * keep / (1 - P)
    y = x.detach() @ w.t() + s * (xd @ A.detach().t()) @ B.detach().t()
    torch.testing.assert_close(fast[0], y, atol=TOL, rtol=TOL)
    # dL/dx = g W + s (g B A) ⊙ mask / (1-p): dropped inputs get only the base gradient
    gx = g @ w + s * (g @ B.detach() @ A.detach()) * keep / (1 - P)
    torch.testing.assert_close(fast[1], gx, atol=TOL, rtol=TOL)
    torch.testing.assert_close(fast[4], s * (g @ B.detach()).t() @ xd, atol=TOL, rtol=TOL)
    torch.testing.assert_close(fast[5], s * g.t() @ (xd @ A.detach().t()), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_mask_drops_fraction_p(p):
    n = 200_000
    keep = dropout_keep_mask(7, (n // 100, 100), p, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (n // 100, 100)
    dropped = 1 - keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma


def _splitmix64(seed: int, i: int) -> int:
    """SplitMix64 (Steele, Lea, Flood 2014) output i for a seed, in plain Python integers."""
    m = (1 << 64) - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 99, 2**62 + 12345])
def test_mask_is_splitmix64_lanes_against_the_threshold(seed):
    # The documented generator, so a GPU kernel can reproduce masks bit for bit: value i's
    # four little-endian 16-bit lanes (as signed) are elements 4i..4i+3, kept when >= round(p * 2^16) - 2^15.
    p, n = 0.3, 64
    keep = dropout_keep_mask(seed, (n,), p, "cpu")
    threshold = round(p * 2**16) - 2**15
    want = []
    for i in range(n // 4):
        value = _splitmix64(seed, i)
        for lane in range(4):
            bits = (value >> (16 * lane)) & 0xFFFF
            want.append((bits - 2**16 if bits >= 2**15 else bits) >= threshold)
    assert keep.tolist() == want


def test_mask_is_a_function_of_the_seed():
    a = dropout_keep_mask(5, (64, 32), 0.5, "cpu")
    assert torch.equal(a, dropout_keep_mask(5, (64, 32), 0.5, "cpu"))
    assert not torch.equal(a, dropout_keep_mask(6, (64, 32), 0.5, "cpu"))
    assert dropout_keep_mask(5, (3, 4), 1.0, "cpu").sum() == 0
    assert dropout_keep_mask(5, (3, 4), 0.0, "cpu").all()


def test_dropout_reproducible_under_manual_seed_and_varies_without():
    args = make((8, 3))
    torch.manual_seed(0)
    first = run(lora_linear, *args, dropout_p=P, training=True)
    torch.manual_seed(0)
    again = run(lora_linear, *args, dropout_p=P, training=True)
    assert_all_close(again, first, atol=0)
    other = run(lora_linear, *args, dropout_p=P, training=True)
    assert not torch.equal(other[0], first[0])


def test_no_dropout_outside_training():
    args = make((8,))
    eval_out = run(lora_linear, *args, dropout_p=0.9, training=False)
    plain = run(lora_linear, *args)
    assert_all_close(eval_out, plain, atol=0)


def test_dropout_one_keeps_only_the_base_path():
    x, w, b, A, B, g = make((8,), bias=True)
    out = run(lora_linear, x, w, b, A, B, g, dropout_p=1.0, training=True)
    torch.testing.assert_close(out[0], F.linear(x.detach(), w, b.detach()), atol=1e-6, rtol=1e-6)
    assert out[4].abs().max() == 0 and out[5].abs().max() == 0


def test_checkpoint_recompute_regenerates_the_same_mask():
    x, w, b, A, B, g = make((4, 5), bias=True)

    def layer(inp):
        return lora_linear(inp, w, b, A, B, 2.0, dropout_p=P, training=True).tanh()

    def grads(use_checkpoint):
        for t in (x, b, A, B):
            t.grad = None
        torch.manual_seed(3)
        y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        y.backward(g)
        return [y.detach()] + [t.grad.clone() for t in (x, b, A, B)]

    assert_all_close(grads(True), grads(False), atol=0)


# --- memory ----------------------------------------------------------------------------------


def saved_activation_bytes(fn, params):
    skip = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_x_once_in_its_own_dtype(p):
    x, w, b, A, B, _ = make((64,), dtype=torch.bfloat16)
    fast = saved_activation_bytes(lambda: lora_linear(x, w, b, A, B, 2.0, p, True), [w, A, B])
    ref = saved_activation_bytes(lambda: lora_linear_reference(x, w, b, A, B, 2.0, p, True), [w, A, B])
    # x (bf16) plus the [N, r] intermediate (in the branch dtype: fp32 for fp32 masters, as
    # peft), and with dropout the keep-mask at 2 bits per element (one byte per 4); no dropped
    # copy, no fp32 copy of x
    mask_bytes = (x.numel() + 3) // 4 if p > 0 else 0
    assert fast == x.numel() * 2 + 64 * R * 4 + mask_bytes
    if p > 0:
        assert ref >= fast + x.numel() * 2  # the reference keeps a dropped copy and a mask


# --- compile and errors ----------------------------------------------------------------------


def test_traces_without_graph_breaks():
    x, w, b, A, B, g = make((2, 3), bias=True)
    compiled = torch.compile(lambda *a: lora_linear(*a, 1.5), backend="aot_eager", fullgraph=True)
    leaves = [x, b, A, B]
    y = compiled(x, w, b, A, B)
    y.backward(g)
    got = [y.detach()] + [t.grad.clone() for t in leaves]
    want = run(lora_linear_reference, x, w, b, A, B, g)
    assert_all_close(got, [want[0], want[1], want[3], want[4], want[5]], atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_all_reported():
    x, w, b, A, B, _ = make((3,), bias=True)
    with pytest.raises(ValueError) as err:
        lora_linear(x[..., :-1], w, b[:-1], A, B[:, :-1], 1.0, dropout_p=1.5)
    msg = str(err.value)
    assert f"x has {IN - 1} features" in msg
    assert f"lora_B must be [{OUT}, {R}]" in msg
    assert f"bias must be None or a tensor of shape [{OUT}]" in msg
    assert "dropout_p must be in [0, 1], got 1.5" in msg
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 24\], got \(4, 23\)"):
        lora_linear_reference(x, w, None, A[:, :-1], B, 1.0)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        lora_linear(torch.ones(3, IN, dtype=torch.long), w, None, A, B, 1.0)
