"""The fp32 CPU GEMM route of the fast paths (oneDNN above a size, torch.mm below) against torch.mm,
and the fused ops at sizes that take the oneDNN route against their references."""
from __future__ import annotations

import platform

import pytest
import torch

from peftkit.kernels import _gemm, linear_cross_entropy, linear_cross_entropy_reference, lora_linear, lora_linear_reference


# 128 x 256 x 256 = 8M multiply-adds: above MIN_ONEDNN_MACS
N, IN, OUT, R = 128, 256, 256, 8
assert N * IN * OUT >= _gemm.MIN_ONEDNN_MACS


ONEDNN_POSSIBLE = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


@pytest.fixture(autouse=True)
def onednn_route(monkeypatch):
    """The route is chosen only on AVX-512 CPUs; the tests below run it wherever oneDNN exists,
    so its results are checked on any x86 machine."""
    monkeypatch.setattr(_gemm, "_ONEDNN_FP32", ONEDNN_POSSIBLE)


def test_onednn_route_is_chosen_only_with_avx512(monkeypatch):
    monkeypatch.undo()
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert _gemm.onednn_fp32_available() == (ONEDNN_POSSIBLE and avx512)
    monkeypatch.setattr(_gemm, "_ONEDNN_FP32", True)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _gemm.onednn_fp32_available()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [N, 3])  # above and below the size threshold
def test_linear_nt_matches_mm(transposed, bias, rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, IN, generator=g)
    w = torch.randn(IN, OUT, generator=g).t() if transposed else torch.randn(OUT, IN, generator=g)
    b = torch.randn(OUT, generator=g) if bias else None
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    got = _gemm.linear_nt(x, w, b)
    assert got.shape == (rows, OUT) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_linear_nt_bf16_is_torch_mm_or_its_fp32_arithmetic():
    """Where the CPU multiplies bf16 natively linear_nt is torch.mm; elsewhere the same product
    in fp32 (exact upcast, fp32 accumulation, one rounding): what torch's bf16 kernel computes,
    5-10x faster on MKL."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(N, IN, generator=g).bfloat16(), torch.randn(OUT, IN, generator=g).bfloat16()
    got = _gemm.linear_nt(x, w)
    if _gemm.slow_16bit_gemm(x):
        assert torch.equal(got, torch.mm(x.float(), w.float().t()).bfloat16())
        torch.testing.assert_close(got, torch.mm(x, w.t()), rtol=0, atol=2 ** -7 * got.abs().max().item())
    else:
        assert torch.equal(got, torch.mm(x, w.t()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("out_in", [(OUT, IN), (40, 3 * IN)])  # blocks of output columns / of the summed dim
def test_16bit_products_in_fp32_upcast_a_block_of_the_weight_at_a_time(dtype, transposed, out_in, monkeypatch):
    """Past UPCAST_BLOCK_BYTES the weight is upcast in blocks along its longer side (output
    columns, or the summed dimension accumulated in fp32), and x goes through in row blocks: the
    product is the one-block product up to summation order."""
    monkeypatch.setattr(_gemm, "native_16bit_gemm", lambda dtype: False)  # the fp32 route on any CPU
    out_features, in_features = out_in
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, in_features, generator=g).to(dtype)
    w = (torch.randn(in_features, out_features, generator=g).t() if transposed
         else torch.randn(out_features, in_features, generator=g)) / in_features**0.5
    w, b = w.to(dtype), torch.randn(out_features, generator=g).to(dtype)
    whole = _gemm.linear_nt(x, w, b)
    want = (x.double() @ w.double().t() + b.double())
    torch.testing.assert_close(whole.double(), want, rtol=0, atol=2 ** -7 * want.abs().max().item())
    # 37 rows of the weight's shorter side a block; x and the product in row blocks of 256 (x: 2.5 blocks)
    monkeypatch.setattr(_gemm, "UPCAST_BLOCK_BYTES", 4 * 37 * min(out_features, in_features))
    x = torch.cat([x, x, x[: N // 2]])
    whole = torch.cat([whole, whole, whole[: N // 2]])
    blocked = _gemm.linear_nt(x, w, b)
    assert blocked.dtype == dtype and blocked.shape == (x.shape[0], out_features) and blocked.is_contiguous()
    torch.testing.assert_close(blocked.double(), whole.double(), rtol=0, atol=2 ** -7 * want.abs().max().item())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_linear_large_fp32_matches_reference(dropout, fan_in_fan_out):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, IN, generator=g, requires_grad=True)
    w = torch.randn(OUT, IN, generator=g) / IN**0.5
    w = w.t().contiguous() if fan_in_fan_out else w
    b = torch.randn(OUT, generator=g)
    A = (torch.randn(R, IN, generator=g) / IN**0.5).requires_grad_()
    B = (torch.randn(OUT, R, generator=g) / R**0.5).requires_grad_()
    grad_out = torch.randn(N, OUT, generator=g)
    results = []
    for fn in (lora_linear, lora_linear_reference):
        for t in (x, A, B):
            t.grad = None
        y = fn(x, w, b, A, B, 2.0, dropout, True, fan_in_fan_out, dropout_seed=11)
        y.backward(grad_out)
        results.append([y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_linear_cross_entropy_large_fp32_matches_reference():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(96, 128, generator=g, requires_grad=True)
    weight = (torch.randn(1024, 128, generator=g) / 128**0.5).requires_grad_()
    labels = torch.randint(0, 1024, (96,), generator=g)
    labels[::7] = -100
    results = []
    for fn in (linear_cross_entropy, linear_cross_entropy_reference):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, labels, chunk_size=40)
        loss.backward()
        results.append([loss.detach(), hidden.grad.clone(), weight.grad.clone()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_exact_where_the_target_probability_underflows(dtype):
    # Targets 200+ logits below the row maximum: p(target) underflows in fp32, so the loss of
    # those rows cannot come from -log(softmax); it must still equal logsumexp - target.
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(24, 16, generator=g)
    weight = torch.randn(64, 16, generator=g)
    hidden[::3] *= 60.0
    logits = hidden @ weight.t()
    labels = logits.argmin(1)  # the least likely class: hopeless rows, huge loss
    labels[1::3] = logits[1::3].argmax(1)  # confident right rows, loss ~ 0
    hidden, weight = hidden.to(dtype).requires_grad_(), weight.to(dtype)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=10)
    loss.backward()
    got_grad, hidden.grad = hidden.grad.clone(), None
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    ref.backward()
    assert torch.isfinite(loss) and loss.item() > 1000
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.float(), hidden.grad.float(), rtol=1e-2, atol=1e-2 * hidden.grad.float().abs().max().item())


def test_onednn_route_traces_under_torch_compile():
    # Inside a compiled graph the oneDNN call is an opaque custom op (with a fake-tensor shape
    # function); the compiled forward and backward equal eager.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, IN, generator=g, requires_grad=True)
    w = torch.randn(OUT, IN, generator=g) / IN**0.5
    A = (torch.randn(R, IN, generator=g) / IN**0.5).requires_grad_()
    B = (torch.randn(OUT, R, generator=g) / R**0.5).requires_grad_()
    head = torch.randn(512, OUT, generator=g) / OUT**0.5  # [V, H]: 64 x 256 x 512 per chunk
    labels = torch.randint(0, 512, (N,), generator=g)

    def step(x):
        h = lora_linear(x, w, None, A, B, 2.0)
        return linear_cross_entropy(h, head, labels, chunk_size=64)

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        for t in (x, A, B):
            t.grad = None
        loss = fn(x)
        loss.backward()
        results.append([loss.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()])
    torch._dynamo.reset()
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_nt_16bit_through_a_transposed_weight_matches_mm(dtype):
    """g @ W (the input gradient through a linear layer), which torch's row-major x row-major
    16-bit CPU kernel runs ~70x slower: the product is the same up to summation order."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, OUT, generator=g).to(dtype)
    w = (torch.randn(OUT, IN, generator=g) / OUT**0.5).to(dtype)  # [out, in]; linear_nt(x, w.t()) = x @ w
    got = _gemm.linear_nt(x, w.t())
    want = x.double() @ w.double()
    assert got.dtype == dtype and got.shape == (N, IN)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("shape", [(40, 96), (96, 40), "transposed"])
def test_16bit_products_in_fp32_work_in_kept_scratch_blocks(monkeypatch, shape):
    """The fp32 route's blocks (x rows, weight, product) are this thread's scratch buffers: a second
    call of the same shape allocates none of them again, and with nothing kept (cap 0: a fresh
    buffer per block) the product is bit-identical. Shapes: blocks of the summed dimension
    (out < in), of output columns (out > in), and a transposed-view weight (the input gradient)."""
    import threading

    from peftkit.kernels import _scratch

    monkeypatch.setattr(_gemm, "native_16bit_gemm", lambda dtype: False)
    monkeypatch.setattr(_scratch, "_THREAD_BUFFERS", threading.local())  # this test's buffers only
    g = torch.Generator().manual_seed(7)
    out_features, in_features = (40, 96) if shape == "transposed" else shape
    x = torch.randn(600, in_features, generator=g).to(torch.bfloat16)
    w = (torch.randn(in_features, out_features, generator=g).t() if shape == "transposed"
         else torch.randn(out_features, in_features, generator=g)).to(torch.bfloat16)
    # weight blocks of 16 along the longer side; x goes through in row blocks of 256
    monkeypatch.setattr(_gemm, "UPCAST_BLOCK_BYTES", 4 * 16 * min(out_features, in_features))
    first = _gemm.linear_nt(x, w)
    want = (x.double() @ w.double().t()).to(torch.bfloat16)
    torch.testing.assert_close(first, want, rtol=2 ** -7, atol=0)
    kept = {key[1]: t.data_ptr() for key, t in _scratch.held().items()}
    assert set(kept) == {"gemm/x", "gemm/weight", "gemm/product"}
    assert torch.equal(_gemm.linear_nt(x, w), first)
    assert {key[1]: t.data_ptr() for key, t in _scratch.held().items()} == kept
    monkeypatch.setattr(_scratch, "SCRATCH_CAP_BYTES", 0)
    _scratch.held().clear()
    assert torch.equal(_gemm.linear_nt(x, w), first) and _scratch.scratch_bytes_held() == 0


def test_the_fp32_route_after_inference_mode_and_under_create_graph(monkeypatch):
    """Buffers first made under torch.inference_mode are ordinary tensors, so training after an
    evaluation can write them; with autograd recording (a create_graph backward) the product is
    torch's own, differentiable."""
    import threading

    from peftkit.kernels import _scratch

    monkeypatch.setattr(_gemm, "native_16bit_gemm", lambda dtype: False)
    monkeypatch.setattr(_scratch, "_THREAD_BUFFERS", threading.local())  # every buffer made below
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        evaluated = _gemm.linear_nt(x * 2, w)
    assert _scratch.scratch_bytes_held("gemm") > 0
    trained = _gemm.linear_nt(x, w)
    assert torch.equal(evaluated, _gemm.linear_nt(x * 2, w))
    xg = x.clone().requires_grad_()
    y = _gemm.linear_nt(xg, w)  # recorded: torch's kernel
    (grad,) = torch.autograd.grad(y.float().sum(), xg, create_graph=True)
    assert y.grad_fn is not None and grad.shape == x.shape
    torch.testing.assert_close(y, trained, rtol=2 ** -7, atol=0)
