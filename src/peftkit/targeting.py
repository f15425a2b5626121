"""Which modules a config selects, with PEFT's exact matching rules."""
from __future__ import annotations

import re
import sys

import torch.nn as nn

SEQ_CLS_HEAD_NAMES = ("classifier", "score")


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D: a linear layer whose weight is stored [in, out] (`fan_in_fan_out`).

    transformers' class and its subclasses, and the copies of it that remote-code models carry
    (same name, an `nf` attribute), which no isinstance check would find. Imports nothing: a
    transformers Conv1D exists only once transformers is loaded.
    """
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (or a subclass) or GPT-2's Conv1D: what "all-linear" selects."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


_LINEAR_TYPES: tuple[type, ...] | None = None


def linear_types() -> tuple[type, ...]:
    """The classes (nn.Linear, transformers' Conv1D) for exact-type checks, e.g. a fast path that
    must not take a subclass such as a quantized Linear; `is_linear` for everything else.
    (Cached in a global, not functools.cache: torch.compile warns on every lru_cache it traces.)"""
    global _LINEAR_TYPES
    if _LINEAR_TYPES is None:
        try:
            from transformers.pytorch_utils import Conv1D

            _LINEAR_TYPES = (nn.Linear, Conv1D)
        except ImportError:  # transformers is optional for the core
            _LINEAR_TYPES = (nn.Linear,)
    return _LINEAR_TYPES


def is_excluded(config, key: str) -> bool:
    excluded = getattr(config, "exclude_modules", None)
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return True
        elif key in excluded or any(key.endswith(f".{name}") for name in excluded):
            return True
    # A module that gets a trainable copy is never also adapted (PEFT's rule).
    for name in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){name}($|\..*)", key):
            return True
    return False


def _layer_index(key: str, layers_pattern) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def matches_target(config, key: str) -> bool:
    """True when module path `key` is selected by `config.target_modules` (and layer filters)."""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{name}") for name in targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def all_linear_targets(model: nn.Module, task_type: str | None) -> list[str]:
    """PEFT's "all-linear": the last name of every linear layer, minus the output head's. On a
    model that already holds adapters, an adapter layer counts under its own name (by its
    wrapped layer) and nothing inside it (its base_layer, lora_A, ...) does."""
    names, inside = set(), ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        wrapped = getattr(module, "base_layer", None) if hasattr(module, "adapter_containers") else None
        if wrapped is not None:
            inside = (f"{name}.",)
            if is_linear(wrapped):
                names.add(name.rsplit(".", 1)[-1])
        elif is_linear(module):
            names.add(name.rsplit(".", 1)[-1])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [head] if head is not None else []
    # A classifier head gets a full trainable copy (modules_to_save), never an adapter; PEFT
    # leaves it out for SEQ_CLS only and then fails on TOKEN_CLS ("modules_to_save cannot be
    # applied to ... lora.Linear"), so both classification tasks drop it here.
    if head is None and task_type in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None]
    for head_module in heads:
        for name, module in model.named_modules():
            if module is head_module:
                names.discard(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: nn.Module, config, default_targets: dict) -> list[str] | str:
    """Turn `None` / "all-linear" into concrete target names; errors list what could be targeted."""
    targets = config.target_modules
    if targets == "all-linear":
        return all_linear_targets(model, config.task_type)
    if targets is not None:
        return targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in default_targets:
        return list(default_targets[model_type])
    raise ValueError(
        f"target_modules is not set and there is no default for model_type={model_type!r} "
        f"(defaults exist for {sorted(default_targets)}). Set target_modules to some of: "
        f"{targetable_names(model)} or 'all-linear'."
    )


def targetable_names(model: nn.Module) -> list[str]:
    """Distinct last names of modules that carry weights directly (what a user might target)."""
    names = set()
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def modules_to_save_names(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT's rule for modules_to_save: a module whose path ends with a given name."""
    return [key for key, _ in model.named_modules() if key and any(key.endswith(name) for name in names)]
