"""Opt-in: route a transformers model's SDPA attention to `kernels.attention` while it trains.

Nothing is routed unless asked. `enable_fast_attention(model)` routes one model (peftkit's
training loop does it for the run when `TrainConfig.fast_attention` is on, its default, and
undoes it afterwards); `disable_fast_attention(model)`, `PeftModel.unload` and
`merge_and_unload` undo it. `get_peft_model` / `PeftModel.from_pretrained` never do it.

How. transformers' attention layers pick their function at call time as
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`, and transformers
has no per-model override of that table. Renaming the implementation to a new entry (the
first design) sends model code that tests the name (Falcon's, Gemma's `== "sdpa"` branches)
down other paths, and finding that code meant reading model source. Here the name stays
"sdpa", so every branch on it, the mask builder and config.json are as before: while at
least one model is routed, the table's "sdpa" entry is a dispatcher that looks at the
attention module it is called with. A module of a routed model (marked by `enable`) may take
the kernel; any other call goes to the entry it replaced with the very same arguments. When
the last routed model is released the replaced entry is put back.

Per call, a routed module takes the kernel only where it is exact and measured faster: a
forward in train mode, on a CPU with native bf16/fp16 GEMMs (`kernels._gemm.native_16bit_gemm`;
without them SDPA is faster), in bf16/fp16 (tensors in it, or fp32 under a bf16/fp16
autocast, as SDPA then runs), without attention dropout, softcap, sinks or position bias,
with keys at most MAX_KV_LEN long, and the "attention" fast path on (`kernels.set_fast_path`;
under torch.compile too: the kernel is a custom op). Every other call (eval mode: inference
and generation; GPU, fp32, long sequences, the switch off) is transformers' SDPA function.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import _private_apis
from .kernels import fast_paths_enabled
from .kernels._dispatch import compute_dtype
from .kernels._gemm import native_16bit_gemm
from .kernels.attention import attention, causal_bias

__all__ = ["enable_fast_attention", "disable_fast_attention", "fast_attention_enabled"]

# Longest key length for the kernel: it keeps the [B, H, Sq, Skv] probabilities for backward
# (2 * H * Skv bytes per token per layer in bf16). Measured on one core, head_dim 64, forward +
# backward against SDPA (benchmarks/kernels_micro.py): ~0.5x at 256 and 512 keys, 1.3-1.5x at 1024.
MAX_KV_LEN = 512
_DTYPES = (torch.bfloat16, torch.float16)
# kwargs that change the attention math and that the kernel does not implement.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
# The mark on each module of a routed model: a plain attribute, which torch.compile guards on
# (a traced layer recompiles when it changes) and which state_dict / save_pretrained ignore.
_MARK = "_peftkit_fast_attention"
# id(module) -> its finalizer, for each marked module alive: the dispatcher leaves the table when
# the last one is released, by `disable_fast_attention` or by garbage collection.
_marked: dict[int, weakref.finalize] = {}
_replaced = None  # the "sdpa" entry the dispatcher stands in for, while it is installed


def enable_fast_attention(model: nn.Module) -> int:
    """Route `model`'s SDPA attention calls to peftkit's kernel (where it applies, see the
    module docstring); returns how many of its configs select "sdpa" (0: nothing to route,
    e.g. eager attention or not a transformers model; the model is then left untouched).
    Idempotent; undone by `disable_fast_attention(model)`, `unload` and `merge_and_unload`."""
    configs = _sdpa_configs(model)
    if not configs:
        return 0
    _install_dispatcher()
    for module in model.modules():
        setattr(module, _MARK, True)
        if id(module) not in _marked:
            finalizer = _marked[id(module)] = weakref.finalize(module, _forget, id(module))
            finalizer.atexit = False
    return len(configs)


def disable_fast_attention(model: nn.Module) -> None:
    """Give `model` back transformers' SDPA attention (a no-op when it was not routed)."""
    for module in model.modules():
        if module.__dict__.pop(_MARK, None) is not None and id(module) in _marked:
            _marked.pop(id(module)).detach()
    if not _marked:
        _restore_dispatcher()


def _forget(key: int) -> None:
    """A marked module was garbage-collected."""
    _marked.pop(key, None)
    if not _marked:
        _restore_dispatcher()


def fast_attention_enabled(model: nn.Module) -> bool:
    """Whether `enable_fast_attention` routes (some of) `model`'s attention now."""
    return _replaced is not None and any(module.__dict__.get(_MARK) for module in model.modules())


def _sdpa_configs(model: nn.Module) -> list:
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            if _private_apis.attn_implementation(config) == "sdpa":
                out.append(config)
    return out


def _install_dispatcher() -> None:
    global _replaced
    current = _private_apis.global_attention_function("sdpa")
    if current is not _dispatch_sdpa:
        # Still set: another library wrapped the dispatcher after we installed it; keeping the
        # function we replaced first avoids a dispatcher that calls itself through the wrapper.
        if _replaced is None:
            _replaced = current
        _private_apis.register_attention_function("sdpa", _dispatch_sdpa)


def _restore_dispatcher() -> None:
    global _replaced
    if _replaced is not None and _private_apis.global_attention_function("sdpa") is _dispatch_sdpa:
        _private_apis.register_attention_function("sdpa", _replaced)
        _replaced = None
    # else: another library registered its own "sdpa" over the dispatcher; it may still call
    # the dispatcher, which then needs `_replaced`.


def _transformers_sdpa():
    return _replaced if _replaced is not None else _private_apis.global_attention_function("sdpa")


def _dispatch_sdpa(module: nn.Module, *args, **kwargs):
    """The "sdpa" entry while models are routed: routed modules to `peftkit_sdpa_attention`,
    every other call, arguments untouched, to the entry it replaced."""
    if getattr(module, _MARK, False):
        return peftkit_sdpa_attention(module, *args, **kwargs)
    return _replaced(module, *args, **kwargs)


def _kernel_applies(module, query, key, attention_mask, dropout, is_causal, kwargs) -> bool:
    if not fast_paths_enabled("attention"):
        return False
    if query.device.type != "cpu" or compute_dtype(query) not in _DTYPES or key.dtype != query.dtype:
        return False
    dtype = compute_dtype(query)
    if dtype in (torch.bfloat16, torch.float16) and not native_16bit_gemm(dtype):
        # Without native bf16/fp16 GEMMs (e.g. AVX2-only CPUs) the kernel's batched products hit
        # torch's slow 16-bit fallback: 2.2x SDPA's time (8 heads x 256 tokens x 64, bf16, Zen 3).
        return False
    if not getattr(module, "training", False):
        # Train mode, not grad mode, decides: reentrant activation checkpointing runs the first
        # forward without grad and recomputes with it, and both must take the same path.
        return False
    if dropout or kwargs.get("output_attentions") or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return False
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len > MAX_KV_LEN or key.shape[-1] != query.shape[-1]:
        return False
    if attention_mask is None and is_causal and q_len != kv_len:
        return False  # SDPA aligns such a causal mask top-left (a prefill into a static cache)
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, kv_len)):
        return False
    return True


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) or an additive float mask as an additive mask in `dtype`."""
    lowest = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, lowest)
    # fp32's lowest value rounds to -inf in bf16; kept finite, a fully masked row cannot give NaN
    return mask.to(dtype).clamp_(min=lowest)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D], each k/v head repeated for its query heads."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def peftkit_sdpa_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: returns ([B, Sq, H, Dv] output, None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1
    if not _kernel_applies(module, query, key, attention_mask, dropout, causal, kwargs):
        return _transformers_sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, **kwargs)
    # Under autocast SDPA runs in the autocast dtype (it is on CPU autocast's lower-precision
    # list); the kernel, an opaque op to autocast, gets its inputs cast the same way.
    dtype = compute_dtype(query)
    if query.dtype != dtype:
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if attention_mask is not None:
        bias = _mask_bias(attention_mask, query.dtype)
    elif causal:
        bias = causal_bias(query.shape[2], key.shape[2], query.dtype, query.device)[None, None]
    else:
        bias = None
    out = attention(query, key, value, bias, scaling)
    return out.transpose(1, 2), None
