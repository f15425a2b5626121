"""The large matmuls of the fast paths: x @ weightᵀ (+ bias), with the fastest exact CPU GEMM.

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

__all__ = ["linear_nt", "native_16bit_gemm", "onednn_fp32_available"]


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


def linear_nt(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, in] @ weight[out, in]ᵀ + bias [out]: a new [N, out] tensor (weight may be a
    transposed view). Call without autograd (inside an autograd.Function).

    A transposed-view weight (the input gradient through a linear layer: g @ W) in bf16 / fp16
    on a CPU without native 16-bit GEMMs meets torch's slowest kernel: with x row-major too it
    runs ~70x slower than with x column-major ([64, 5632] @ [5632, 2048] bf16, one thread: 5.7 s
    vs 0.06 s). x is then copied column-major first (an [N, in] copy, small next to the weight);
    the result differs only in summation order."""
    if (x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and weight.dim() == 2
            and weight.t().is_contiguous() and not weight.is_contiguous() and x.stride(-1) == 1
            and not torch.compiler.is_compiling()):
        if torch.backends.mkldnn.is_available() and not native_16bit_gemm(x.dtype):
            x = x.t().contiguous().t()
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
