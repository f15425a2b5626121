"""Frozen base layers whose weight is stored quantized: bitsandbytes 4-bit (nf4 / fp4, double
quantization) and 8-bit (`Linear4bit`, `Linear8bitLt`, as transformers loads them with
`BitsAndBytesConfig`), and torchao's NF4 tensor as an `nn.Linear` weight (torchtune's QLoRA).

What an adapter needs from such a layer, whatever the storage: its [out, in] sizes, the weight
as floats (DoRA's norm, PiSSA/OLoRA init, merging) and a way to store a changed weight back in
the layer's own format. Nothing here imports bitsandbytes or torchao unless the model already
holds their layers (their modules are looked up in `sys.modules`), so plain models pay nothing.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

BNB_4BIT, BNB_8BIT, TORCHAO_NF4 = "bitsandbytes-4bit", "bitsandbytes-8bit", "torchao-nf4"


def _bnb_nn():
    return getattr(sys.modules.get("bitsandbytes"), "nn", None)


_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")


def _nf4_tensor_type() -> type | None:
    """torchao's NF4Tensor class once torchao has loaded it (its module moved between releases)."""
    for name in _NF4_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            return getattr(module, "NF4Tensor", None)
    return None


def quantized_format(module: nn.Module) -> str | None:
    """BNB_4BIT, BNB_8BIT or TORCHAO_NF4 for a linear layer with a quantized weight, else None."""
    bnb = _bnb_nn()
    if bnb is not None:
        if isinstance(module, bnb.Linear4bit):
            return BNB_4BIT
        if isinstance(module, bnb.Linear8bitLt):
            return BNB_8BIT
    nf4 = _nf4_tensor_type()  # an adapter layer forwards `.weight` to its base: nn.Linear only
    if nf4 is not None and isinstance(module, nn.Linear) and isinstance(module.weight, nf4):
        return TORCHAO_NF4
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantized_format(module) is not None


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's logical shape ([out, in] for a linear layer): a packed 4-bit weight is stored
    as [out * in / 2, 1] bytes."""
    if quantized_format(module) == BNB_4BIT:
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of a quantized linear layer as a plain [out, in] tensor (the values its forward
    multiplies by), in `dtype`; a plain layer's weight as is (cast)."""
    kind = quantized_format(module)
    weight = module.weight
    if kind == BNB_4BIT:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if kind == BNB_8BIT:
        import bitsandbytes.functional as bnbf

        scale = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scale.to(weight.device)).to(dtype)
    if kind == TORCHAO_NF4:
        return weight.get_original_weight().to(dtype)
    return weight.detach().to(dtype)


@torch.no_grad()
def store_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize `weight` ([out, in], any float dtype) into `module` in the module's own format
    (block size, quant type, double quantization and storage dtype kept)."""
    kind = quantized_format(module)
    old = module.weight
    if kind == BNB_4BIT:
        import bitsandbytes as bnb

        state = old.quant_state
        new = bnb.nn.Params4bit(weight.to("cpu", state.dtype), requires_grad=False, blocksize=state.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=state.quant_type,
                                quant_storage=old.quant_storage, module=module)
        module.weight = new.to(old.device)
    elif kind == BNB_8BIT:
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False,
                                has_fp16_weights=old.has_fp16_weights)
        module.weight = new.to(old.device)
        module.state.reset_grads()
        module.state.SCB = module.weight.SCB
    elif kind == TORCHAO_NF4:
        from torchao.quantization import to_nf4

        new = to_nf4(weight.to(old.device, old.dtype), old.block_size, old.scaler_block_size)
        module.weight = nn.Parameter(new, requires_grad=False)
    else:
        old.data.copy_(weight.to(old.dtype))


def take_weight(module: nn.Module) -> tuple:
    """The layer's quantized weight as it is now, for `restore_weight` after a merge: putting it
    back makes unmerging exact (quantizing W + dW and taking dW out again would round W twice).
    bitsandbytes' 8-bit layer moves its int8 matrix and scales into `state` on first use."""
    weight = module.weight
    if quantized_format(module) != BNB_8BIT:
        return (weight,)
    in_weight = weight.CB is not None  # not used yet: the matrix and scales are still on the weight
    return (weight, weight.CB if in_weight else module.state.CB, weight.SCB if in_weight else module.state.SCB)


def restore_weight(module: nn.Module, taken: tuple) -> None:
    """Put back what `take_weight` took."""
    module.weight = taken[0]
    if quantized_format(module) == BNB_8BIT:
        module.state.reset_grads()
        module.weight.CB, module.weight.SCB = taken[1], taken[2]  # forward moves them into state again


# Dequantized rows per step of a 4-bit product by rows: uniform scratch, below the 1 MiB from which
# `recipe.quantization.return_freed_buffers_to_system` has glibc map buffers afresh.
_ROWS_BYTES = 512 << 10


def _bnb_4bit_rows(module: nn.Module, dtype: torch.dtype):
    """(start, stop, rows) over a bitsandbytes 4-bit layer's weight, dequantized into `dtype`
    `_ROWS_BYTES` of rows at a time: the values bitsandbytes' own forward multiplies by, without a
    full-size temporary per call."""
    import math

    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = weight.quant_state
    out_features, in_features = state.shape
    absmax = state.absmax
    if state.nested:  # double quantization: the block scales are themselves 8-bit
        absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    # a step holds whole blocks of `blocksize` weights and whole bytes (two weights each)
    unit = math.lcm(state.blocksize // math.gcd(in_features, state.blocksize), 2 // math.gcd(in_features, 2))
    step = max(unit, _ROWS_BYTES // (in_features * dtype.itemsize) // unit * unit)
    packed = weight.data.view(torch.uint8).reshape(-1)
    for start in range(0, out_features, step):
        stop = min(out_features, start + step)
        first, last = start * in_features, stop * in_features
        rows_state = bnbf.QuantState(absmax=absmax[first // state.blocksize: -(-last // state.blocksize)],
                                     shape=torch.Size((stop - start, in_features)), code=state.code,
                                     blocksize=state.blocksize, quant_type=state.quant_type, dtype=dtype)
        yield start, stop, bnbf.dequantize_4bit(packed[first // 2: (last + 1) // 2].view(-1, 1), rows_state)


def _chunked_4bit_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' Linear4bit.forward computes (x in the compute dtype times the weight
    dequantized into it, plus bias, back to x's dtype), a few output columns at a time."""
    dtype = module.compute_dtype or x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    out = x2.new_empty(x2.shape[0], module.out_features)
    for start, stop, rows in _bnb_4bit_rows(module, dtype):
        out[:, start:stop] = torch.nn.functional.linear(x2, rows, None if bias is None else bias[start:stop])
    return out.view(*x.shape[:-1], module.out_features).to(x.dtype)


def _by_rows(module: nn.Module, x: torch.Tensor) -> bool:
    """Dequantize a few rows at a time: bitsandbytes 4-bit layers on the CPU, where glibc keeps
    freed full-size weight temporaries (tens of MB, sizes varying by layer) in a fragmenting heap.
    A GPU's caching allocator reuses them; there the library's own fused kernels run, and so they
    do on a weight bitsandbytes has repacked for AVX512-BF16 CPUs (another byte order)."""
    return (x.device.type == "cpu" and quantized_format(module) == BNB_4BIT
            and not getattr(module.weight.quant_state, "packing_format_for_cpu", False))


class _DequantizingBackward(torch.autograd.Function):
    """A 4-bit layer's own forward, and an input gradient g @ W from its weight dequantized in
    backward (nothing kept between the passes, as bitsandbytes' and torchao's own backward).
    bitsandbytes layers on the CPU go by rows in both passes (`_by_rows`), the gradient in fp32,
    rounded once; the others through `kernels.linear_nt` (fp32 products on CPUs without native
    16-bit GEMMs, where the libraries' own bf16 backward, a row-major g times a row-major W, is
    ~70x slower still than torch's other bf16 products)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        with torch.no_grad():
            return _chunked_4bit_forward(module, x) if _by_rows(module, x) else module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from ..kernels._gemm import linear_nt

        g = grad.reshape(-1, grad.shape[-1])
        if _by_rows(ctx.module, g):  # in fp32 throughout: one rounding, at the end
            g32 = g.float()
            grad_x = g32.new_zeros(g.shape[0], ctx.module.in_features)
            # the weights the forward multiplied by (in the compute dtype), then in fp32
            for start, stop, rows in _bnb_4bit_rows(ctx.module, ctx.module.compute_dtype or ctx.x_dtype):
                grad_x.addmm_(g32[:, start:stop], rows.float())
        else:
            weight = dequantized_weight(ctx.module, g.dtype)  # [out, in]
            grad_x = linear_nt(g, weight.t())
        return grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype), None


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a frozen quantized layer, with the faster input gradient for 4-bit
    layers (`_DequantizingBackward`); 8-bit layers (LLM.int8's own backward) run as they are. In
    training a bitsandbytes 4-bit layer on the CPU computes by rows (`_by_rows`): the same output
    (bit for bit in bf16 as measured; in fp32 to summation order, the product split by columns)."""
    if any(p.requires_grad for p in module.parameters()):
        return module(x)
    if quantized_format(module) in (BNB_4BIT, TORCHAO_NF4) and torch.is_grad_enabled() and x.requires_grad:
        return _DequantizingBackward.apply(x, module)
    if module.training and _by_rows(module, x):
        return _chunked_4bit_forward(module, x)  # no gradient: it saves nothing for backward
    return module(x)


def dequantized_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear computing what `module` computes (its weight dequantized) in `dtype`."""
    out_features, in_features = weight_shape(module)
    weight = dequantized_weight(module, dtype)
    plain = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return plain


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Module path -> format for every quantized linear layer in `model`."""
    return {name: kind for name, module in model.named_modules() if (kind := quantized_format(module))}


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every quantized linear layer of `model` (adapter layers' bases included) by a plain
    nn.Linear holding its dequantized weight in `dtype`; drop transformers' quantization markers so
    that `save_pretrained` writes a plain model. Returns the replaced paths."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dequantized_linear(module, dtype))
        replaced.append(name)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(module, flag, False) is True:
                try:
                    setattr(module, flag, False)
                except AttributeError:  # a read-only property derived from the quantizer below
                    pass
        if getattr(module, "hf_quantizer", None) is not None:
            module.hf_quantizer = None
        if getattr(module, "quantization_method", None) is not None:
            module.quantization_method = None
    return replaced
