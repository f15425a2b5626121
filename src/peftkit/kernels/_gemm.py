"""The large matmuls of the fast paths: x @ weightᵀ (+ bias), with the fastest exact CPU GEMM.

16-bit products on CPUs without native bf16 / fp16 GEMMs run in fp32 (`linear_nt`).

On x86 CPUs, torch's fp32 `mm` calls MKL's sgemm, which runs its AVX2 code on non-Intel CPUs
(measured on an AMD EPYC with AVX-512: ~100 GFLOP/s per core); oneDNN's fp32 matmul, which torch
also ships, uses AVX-512 there (~230 GFLOP/s, benchmarks/README.md). Without AVX-512 oneDNN has
no such edge (a Zen 3 EPYC with AVX2: oneDNN 78 GFLOP/s, MKL 90), so the route is taken only
where torch reports AVX-512. Both compute in fp32 with fp32 accumulation, so results differ only
in summation order. bf16 `mm` already goes through oneDNN, other dtypes and devices stay on
`torch.mm`.
"""
from __future__ import annotations

import platform

import torch
from torch import Tensor

from . import _scratch

__all__ = ["linear_nt", "native_16bit_gemm", "onednn_fp32_available", "product_into", "slow_16bit_gemm",
           "upcast_to_scratch"]


def _onednn_fp32() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # aarch64 builds route oneDNN to other backends; not measured
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


_ONEDNN_FP32 = _onednn_fp32()

# oneDNN's per-call overhead (~15 us) beats its faster inner loop only from ~2M multiply-adds
# (measured crossover between 64x64x64 and 64x256x256); below it torch.mm is quicker.
MIN_ONEDNN_MACS = 2**21


def onednn_fp32_available() -> bool:
    """Whether fp32 CPU matmuls of the fast paths run on oneDNN (else torch.mm)."""
    return _ONEDNN_FP32 and torch.backends.mkldnn.enabled


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


# Under torch.compile the call goes through an opaque custom op: inductor cannot lower the
# oneDNN op with a plain (not pre-packed) weight, and would otherwise fall back to torch.mm.
@torch.library.custom_op("peftkit::onednn_linear_fp32", mutates_args=())
def _onednn_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _onednn_linear(x, weight, bias)


@_onednn_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


_NATIVE_16BIT: dict[torch.dtype, bool] = {}


def native_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16 / fp16) natively: AVX512_BF16 / AVX512_FP16 or
    AMX, as oneDNN reports it. Without, torch's 16-bit CPU GEMMs are a slow fallback whose speed
    depends on the operands' layout (see `linear_nt`)."""
    native = _NATIVE_16BIT.get(dtype)
    if native is None:
        if not torch.backends.mkldnn.is_available():
            native = False
        elif dtype == torch.bfloat16:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        else:
            native = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        _NATIVE_16BIT[dtype] = native
    return native


def slow_16bit_gemm(x: Tensor) -> bool:
    """Whether `x` is a bf16 / fp16 CPU tensor on a CPU without native GEMMs for it (where
    `linear_nt` multiplies in fp32)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and not native_16bit_gemm(x.dtype))


# fp32 blocks of `_via_fp32`: weight blocks of at most UPCAST_BLOCK_BYTES, and row blocks of x and
# of the product (at least 256 rows). They are this thread's scratch buffers (`_scratch`, within
# its budget): fresh ones per block, about a thousand MB-sized allocations per training step of
# the route benchmark's width a, left holes in glibc's heap between the activations.
UPCAST_BLOCK_BYTES = 1 << 20


def _via_fp32(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weightᵀ (+ bias) for 16-bit CPU operands, computed in fp32 and rounded once to x's
    dtype: the arithmetic of torch's 16-bit CPU GEMM (exact upcast, fp32 accumulation), on MKL's
    sgemm. x goes through in row blocks (at least 256 rows), each by `product_into`; a weight of
    at most UPCAST_BLOCK_BYTES in fp32 is upcast once for all of them."""
    n, (out_features, in_features) = x.shape[0], weight.shape
    out = x.new_empty(n, out_features)
    if weight.numel() * 4 <= UPCAST_BLOCK_BYTES:
        weight = upcast_to_scratch(weight, "gemm/weight")
    bias32 = None if bias is None else bias.float()
    step = max(256, UPCAST_BLOCK_BYTES // (4 * max(in_features, out_features)))
    for start in range(0, n, step):
        product_into(out[start:start + step], upcast_to_scratch(x[start:start + step], "gemm/x"), weight, bias32)
    return out


def product_into(out: Tensor, x32: Tensor, weight: Tensor, bias32: Tensor | None = None) -> Tensor:
    """out[:] = x32 @ weightᵀ (+ bias32), for fp32 x32 [M, in] and a bf16 / fp16 / fp32 weight
    [out, in] (may be a transposed view): computed in fp32 and rounded once into `out` (any float
    dtype). A 16-bit weight is upcast UPCAST_BLOCK_BYTES at a time along its longer side, the
    block's other side whole: blocks of output columns, or blocks of the summed dimension
    accumulated in fp32. Works in this thread's "gemm/weight" and "gemm/product" scratch
    buffers, so x32 may be the "gemm/x" one; not differentiable (call without autograd)."""
    rows, (out_features, in_features) = x32.shape[0], weight.shape
    upcast = weight.dtype in (torch.bfloat16, torch.float16)
    if out_features >= in_features or not upcast:
        step = max(1, UPCAST_BLOCK_BYTES // (4 * in_features) if upcast else out_features)
        for start in range(0, out_features, step):
            w32 = upcast_to_scratch(weight[start:start + step], "gemm/weight") if upcast else weight
            y32 = _fp32_scratch("gemm/product", (rows, w32.shape[0]), x32.device)
            torch.mm(x32, w32.t(), out=y32)
            if bias32 is not None:
                y32 += bias32[start:start + step]
            out[:, start:start + step].copy_(y32)
        return out
    acc = _fp32_scratch("gemm/product", (rows, out_features), x32.device).zero_()
    step = max(1, UPCAST_BLOCK_BYTES // (4 * out_features))
    for start in range(0, in_features, step):
        acc.addmm_(x32[:, start:start + step], upcast_to_scratch(weight[:, start:start + step], "gemm/weight").t())
    if bias32 is not None:
        acc += bias32
    return out.copy_(acc)


def _fp32_scratch(slot: str, shape: tuple[int, int], device) -> Tensor:
    return _scratch.scratch(device, shape[0] * shape[1], slot, torch.float32).view(shape)


def upcast_to_scratch(t: Tensor, slot: str) -> Tensor:
    """2-D `t` in fp32 (exact) in this thread's scratch buffer `slot` ("gemm/..."), in t's layout
    where t is a transposed view (the input gradient's weight), else contiguous."""
    if not t.is_contiguous() and t.t().is_contiguous():
        return upcast_to_scratch(t.t(), slot).t()
    return _fp32_scratch(slot, tuple(t.shape), t.device).copy_(t)


def _recording(*tensors: Tensor) -> bool:
    """Whether autograd records ops on these (a backward run with create_graph=True): the fp32
    route writes into scratch buffers, which cannot be part of a graph; torch's kernel then runs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def linear_nt(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, in] @ weight[out, in]ᵀ + bias [out]: a new [N, out] tensor (weight may be a
    transposed view). Call without autograd (inside an autograd.Function).

    bf16 / fp16 on a CPU without native 16-bit GEMMs: torch's 16-bit kernel there is a slow
    fallback (one thread, this AVX2 EPYC: 9-10 GFLOP/s, and ~70x slower still for a row-major x
    times a transposed-view weight, the input gradient g @ W), so the product runs in fp32 on
    MKL (50-90 GFLOP/s) by `_via_fp32`: the same arithmetic, one rounding at the end (eager
    only: a compiled graph keeps torch's kernel)."""
    if (x.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling()
            and weight.dtype == x.dtype and weight.dim() == 2 and slow_16bit_gemm(x) and not _recording(x, weight)):
        return _via_fp32(x, weight, bias)
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.shape[0] * x.shape[1] * weight.shape[0] >= MIN_ONEDNN_MACS
        and onednn_fp32_available()
    ):
        if torch.compiler.is_compiling():
            return _onednn_linear_op(x, weight, bias)
        return _onednn_linear(x, weight, bias)
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
