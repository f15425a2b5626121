"""Hotswap: replace the weights of a loaded LoRA adapter in place with another saved adapter's,
so that a `torch.compile`d model keeps its compiled code (peft's `hotswap_adapter` and
`prepare_model_for_compiled_hotswap`, same names and rules).

In-place copies keep every tensor a compiled graph holds. Two things could still make torch
recompile, and `prepare_model_for_compiled_hotswap` (called before compiling) removes them:
a Python-float scaling (alpha / r) is a constant the graph guards on, so it becomes a 0-d
tensor that the swap fills; and adapters of different ranks have different shapes, so every
LoRA A / B is zero-padded to `target_rank` (zero rows and columns add nothing to B A).
"""
from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn as nn

from ...checkpoint.adapter_check import read_checked_adapter
from ...checkpoint.keys import PREFIX
from ...config import PeftConfig
from ..base import AdapterLayer
from . import _pattern_value
from .layer import Conv2d, Embedding, Linear, LoraLayer

# Config fields that change the output beyond the weights and scaling; they must agree (peft's list).
MUST_AGREE = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
# Local keys of LoRA factors and the dimension that holds the rank.
RANK_DIM = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def _unwrap(model: nn.Module) -> nn.Module:
    """The PeftModel behind a `torch.compile(model)` wrapper."""
    inner = getattr(model, "_orig_mod", model)
    if not hasattr(inner, "peft_config") or not hasattr(inner, "get_base_model"):
        raise TypeError(f"expected a peftkit PeftModel (or torch.compile of one), got {type(inner).__name__}")
    return inner


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: PeftConfig | dict[str, PeftConfig] | None = None,
                                       check_compiled: str = "error") -> None:
    """Before `torch.compile`: hold every LoRA scaling as a 0-d tensor and, with `target_rank`,
    zero-pad every LoRA A / B to that rank (the largest rank that will be swapped in), so that
    `hotswap_adapter` never recompiles. The outputs do not change. `config` (one LoraConfig or
    a dict of them, e.g. `model.peft_config`) gets `r` (and `rank_pattern`) set to `target_rank`."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled={check_compiled!r}; accepted: 'error', 'warn', 'ignore'")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        message = "prepare_model_for_compiled_hotswap must be called before torch.compile, not on a compiled model"
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            import warnings

            warnings.warn(message + ": it will recompile", stacklevel=2)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("prepare_model_for_compiled_hotswap found no LoRA layer in the model; load the first adapter "
                         "before calling it")
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int)
                                    or target_rank < 1):
        raise ValueError(f"target_rank={target_rank!r}; give a positive int (the largest rank to be swapped in)")
    dora = sorted(f"{path} ({name})" for path, layer in layers for name, on in layer.use_dora.items() if on)
    if dora:
        raise ValueError(f"prepare_model_for_compiled_hotswap does not support DoRA adapters (use_dora=True): {dora}")
    too_big = sorted(f"{path} ({name}: r={r})" for path, layer in layers for name, r in layer.r.items()
                     if target_rank is not None and r > target_rank)
    if too_big:
        raise ValueError(f"target_rank={target_rank} is smaller than the rank of {too_big}; give the largest rank")
    for _, layer in layers:
        device = layer.base_layer.weight.device
        for name, value in layer.scaling.items():
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), device=device)
        if target_rank is not None:
            for name in list(layer.r):
                _pad(layer, name, target_rank)
    if target_rank is not None and config:
        for lora_config in (config.values() if isinstance(config, dict) else [config]):
            _config_at_rank(lora_config, target_rank)


def _config_at_rank(config, rank: int) -> None:
    """The config of the padded adapter: r (and rank_pattern) become `rank`, and lora_alpha (and
    alpha_pattern) change with them so that every layer keeps its scaling (alpha / r, or
    alpha / sqrt(r) with rsLoRA): saved and loaded again, the adapter computes what it did."""
    factor = (lambda r: math.sqrt(rank / r)) if config.use_rslora else (lambda r: rank / r)
    ranks, alphas = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    config.alpha_pattern = {key: alphas.get(key, config.lora_alpha) * factor(ranks.get(key, config.r))
                            for key in {**ranks, **alphas}}
    config.lora_alpha = config.lora_alpha * factor(config.r)
    config.r = rank
    config.rank_pattern = {key: rank for key in ranks}


@torch.no_grad()
def _padded(weight: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    shape = list(weight.shape)
    shape[dim] = rank
    out = weight.new_zeros(shape)
    out.narrow(dim, 0, weight.shape[dim]).copy_(weight)
    return out


def _pad(layer: LoraLayer, name: str, rank: int) -> None:
    """Replace adapter `name`'s factors of `layer` by zero-padded ones of rank `rank`."""
    if layer.r[name] == rank:
        return
    if isinstance(layer, Embedding):
        for attr, dim in (("lora_embedding_A", 0), ("lora_embedding_B", 1)):
            old = getattr(layer, attr)[name]
            getattr(layer, attr)[name] = nn.Parameter(_padded(old.data, dim, rank), requires_grad=old.requires_grad)
    elif isinstance(layer, (Linear, Conv2d)):
        for attr, dim in (("lora_A", 0), ("lora_B", 1)):
            old = getattr(layer, attr)[name]
            new = copy.deepcopy(old)  # same module type and settings, then the wider weight
            new.weight = nn.Parameter(_padded(old.weight.data, dim, rank), requires_grad=old.weight.requires_grad)
            if isinstance(new, nn.Linear):
                new.in_features, new.out_features = new.weight.shape[1], new.weight.shape[0]
            else:
                new.in_channels, new.out_channels = new.weight.shape[1], new.weight.shape[0]
            getattr(layer, attr)[name] = new
    else:
        raise ValueError(f"cannot pad the LoRA layer type {type(layer).__name__}; supported: Linear, Embedding, Conv2d")
    layer.r[name] = rank


def check_configs_compatible(old: PeftConfig, new: PeftConfig) -> None:
    """The new adapter must be LoRA like the old one, with the same output-shaping settings."""
    if old.peft_type != "LORA" or new.peft_type != "LORA":
        raise ValueError(f"hotswap supports LoRA adapters only (as peft); got {old.peft_type} -> {new.peft_type}")
    for key in MUST_AGREE:
        if getattr(old, key) != getattr(new, key):
            raise ValueError(f"the adapters cannot be hotswapped: {key} differs (loaded: {getattr(old, key)!r}, "
                             f"new: {getattr(new, key)!r})")


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: str | None = None,
                    **kwargs) -> None:
    """Replace adapter `adapter_name`'s weights and scaling with those of the adapter saved in
    folder `model_name_or_path`, in place: the name, the modules and every tensor object stay,
    so a compiled model does not recompile (with `prepare_model_for_compiled_hotswap` when ranks
    or alphas differ). `model` is the PeftModel or `torch.compile(model)` of it.

    The new adapter may target fewer modules than the loaded one (those get zero factors) but no
    module the loaded one does not adapt; its ranks may be smaller than the loaded (or padded)
    rank, never larger. Nothing is changed when a check fails."""
    subfolder = kwargs.pop("subfolder", None)
    if kwargs:
        raise TypeError(f"hotswap_adapter got unsupported keyword arguments {sorted(kwargs)}; peftkit reads local "
                        f"adapter folders (accepted: subfolder)")
    folder = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
    inner = _unwrap(model)
    if adapter_name not in inner.peft_config:
        raise ValueError(f"adapter {adapter_name!r} is not loaded; loaded adapters: {list(inner.peft_config)}")
    config = PeftConfig.from_pretrained(folder)
    check_configs_compatible(inner.peft_config[adapter_name], config)
    base = inner.get_base_model()
    layers = [(p, m) for p, m in base.named_modules() if isinstance(m, AdapterLayer) and adapter_name in m.adapter_names]
    merged = sorted(p for p, m in layers if adapter_name in m.merged_adapters)
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights ({merged[:3]}...); call "
                         f"unmerge_adapter() before hotswapping")
    state = read_checked_adapter(folder, config)  # float, finite, sizes that fit: as any adapter load
    if torch_device is not None:
        state = {k: v.to(torch_device) for k, v in state.items()}
    copies, scalings = _plan(layers, adapter_name, state, config)
    with torch.no_grad():
        for target, source, dim in copies:
            if source is None or dim is None or source.shape[dim] == target.shape[dim]:
                target.copy_(source if source is not None else torch.zeros_like(target))
            else:
                target.zero_()
                target.narrow(dim, 0, source.shape[dim]).copy_(source)
    for layer, scaling in scalings:
        current = layer.scaling[adapter_name]
        if isinstance(current, torch.Tensor):
            current.fill_(scaling)
        else:
            layer.scaling[adapter_name] = scaling
        if hasattr(layer, "_base_changed"):
            layer._base_changed()  # variants drop what they derived from the old factors (DoRA's norm)


def _plan(layers, adapter_name: str, state: dict, config: PeftConfig):
    """Check every tensor of the new adapter against the loaded one; return the copies
    (target, source or None for zeros, rank dim or None) and the new scalings, or raise."""
    remaining = dict(state)
    copies, scalings, problems = [], [], []
    for path, layer in layers:
        prefix = f"{PREFIX}{path}."
        for local, target in layer.adapter_state(adapter_name).items():
            key = prefix + local
            source = remaining.pop(key, None)
            dim = RANK_DIM.get(local) if isinstance(layer, LoraLayer) else None
            if source is None:
                if dim is None:
                    problems.append(f"{key} is missing from the new adapter")
                copies.append((target, None, dim))
                continue
            source = source.to(device=target.device, dtype=target.dtype)
            if source.shape != target.shape:
                others_equal = dim is not None and all(s == t for i, (s, t) in enumerate(zip(source.shape, target.shape))
                                                       if i != dim) and source.dim() == target.dim()
                if not others_equal or source.shape[dim] > target.shape[dim]:
                    hint = (" (its rank is larger: call prepare_model_for_compiled_hotswap(model, target_rank=...) "
                            "with the largest rank before compiling)") if others_equal else ""
                    problems.append(f"{key}: the loaded adapter has shape {tuple(target.shape)}, the new one "
                                    f"{tuple(source.shape)}{hint}")
                    continue
            copies.append((target, source, dim))
        base_key = prefix + "base_layer.weight"
        if isinstance(layer, Embedding) and base_key in remaining:
            # peft saves the whole embedding matrix beside an embedding adapter; loading copies it in
            source = remaining.pop(base_key)
            if source.shape != layer.base_layer.weight.shape:
                problems.append(f"{base_key}: the model has shape {tuple(layer.base_layer.weight.shape)}, the new "
                                f"adapter {tuple(source.shape)}")
            else:
                copies.append((layer.base_layer.weight.data, source.to(layer.base_layer.weight.device), None))
        if isinstance(layer, LoraLayer):
            r = _pattern_value(config.rank_pattern, path, config.r)
            alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
            scalings.append((layer, alpha / math.sqrt(r) if config.use_rslora else alpha / r))
    if remaining:
        problems.append(f"the new adapter has tensors for modules the loaded adapter {adapter_name!r} does not adapt "
                        f"(hotswap needs the same target modules): {sorted(remaining)}")
    if problems:
        raise ValueError("cannot hotswap:\n- " + "\n- ".join(problems))
    return copies, scalings
