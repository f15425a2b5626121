"""Route a transformers model's SDPA attention to `kernels.attention` while adapters train.

transformers looks up each attention layer's function by `config._attn_implementation` at
call time. `PeftModel` switches configs set to "sdpa" to "peftkit_sdpa", registered here with
the same mask builder as "sdpa", and switches them back on unload/merge. Per call, the kernel
runs only where it is exact and measured faster: a forward in train mode, on CPU, in
bf16/fp16 (tensors in it, or fp32 under a bf16/fp16 autocast, as SDPA then runs), without
attention dropout, softcap, sinks or position bias, with keys at most MAX_KV_LEN long, and
fast paths on (under torch.compile too: the kernel is a custom op).
Every other call (eval mode: inference and generation; GPU, fp32, long sequences, fast paths
off) is transformers' own SDPA function with the same arguments.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from .kernels import fast_paths_enabled
from .kernels._dispatch import compute_dtype
from .kernels.attention import attention, causal_bias

NAME = "peftkit_sdpa"

# Longest key length for the kernel: it keeps the [B, H, Sq, Skv] probabilities for backward
# (2 * H * Skv bytes per token per layer in bf16). Measured on one core, head_dim 64, forward +
# backward against SDPA (benchmarks/kernels_micro.py): ~0.5x at 256 and 512 keys, 1.3-1.5x at 1024.
MAX_KV_LEN = 512
_DTYPES = (torch.bfloat16, torch.float16)
# kwargs that change the attention math and that the kernel does not implement.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
_registered = False


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _kernel_applies(module, query, key, attention_mask, dropout, is_causal, kwargs) -> bool:
    if not fast_paths_enabled():
        return False
    if query.device.type != "cpu" or compute_dtype(query) not in _DTYPES or key.dtype != query.dtype:
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


def peftkit_sdpa_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: returns ([B, Sq, H, Dv] output, None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1
    if not _kernel_applies(module, query, key, attention_mask, dropout, causal, kwargs):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    # Under autocast SDPA runs in the autocast dtype (it is on CPU autocast's lower-precision
    # list); the kernel, an opaque op to autocast, gets its inputs cast the same way.
    dtype = compute_dtype(query)
    if query.dtype != dtype:
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if attention_mask is not None:
        bias = _mask_bias(attention_mask, query.dtype)
    elif causal:
        bias = causal_bias(query.shape[2], key.shape[2], query.dtype, query.device)[None, None]
    else:
        bias = None
    out = attention(query, key, value, bias, scaling)
    return out.transpose(1, 2), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, peftkit_sdpa_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal") and id(config) not in seen:
            seen.add(id(config))
            out.append(config)
    return out


# Model code that tests the implementation by its name (e.g. Falcon's `== "sdpa"` branches)
# would take another path under a new name: such models keep "sdpa".
_NAME_TESTS = ('_attn_implementation == "sdpa"', '_attn_implementation != "sdpa"', "_attn_implementation in [",
               "_attn_implementation in (")
_source_tests_name: dict[str, bool] = {}


def _tests_the_name(module: nn.Module) -> bool:
    name = type(module).__module__
    if name not in _source_tests_name:
        source = ""
        if name.startswith("transformers.models."):
            try:
                source = inspect.getsource(sys.modules[name])
            except (KeyError, OSError, TypeError):
                source = ""
        _source_tests_name[name] = any(test in source for test in _NAME_TESTS)
    return _source_tests_name[name]


def install(model: nn.Module) -> int:
    """Switch every config of `model` that selects "sdpa" to the routed function; returns how
    many were switched (0 for models that are not transformers models, use another kind, or
    whose code tests the implementation by name)."""
    if any(_tests_the_name(m) for m in model.modules()):
        return 0
    configs = [c for c in _configs(model) if c._attn_implementation_internal == "sdpa"]
    if configs:
        _register()
        for config in configs:
            config._attn_implementation_internal = NAME  # not the setter: it would recurse into sub-configs
    return len(configs)


def uninstall(model: nn.Module) -> None:
    """Put "sdpa" back wherever `install` switched it."""
    for config in _configs(model):
        if config._attn_implementation_internal == NAME:
            config._attn_implementation_internal = "sdpa"
