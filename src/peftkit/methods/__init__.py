"""Registry of adapter methods: peft_type -> (config class, how to adapt a module).

Each method lives in its own sub-package and registers itself on import; every
sub-package here is imported once, so adding a method means adding a folder.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type
    # (module, module_name, config, adapter_name) -> adapter layer wrapping `module`, or None when
    # the module type is not supported by the method.
    create_layer: Callable[..., nn.Module | None] | None = None
    # Module types the method can adapt, by name, for error messages.
    supported_types: tuple[str, ...] = ()
    # model_type -> default target module names (used when target_modules is None).
    default_targets: dict = field(default_factory=dict)
    # Whole-model methods (prompt tuning) wrap the model's forward instead of layers.
    prompt_learning: bool = False
    # (model, config) -> None: fills config fields whose defaults depend on the model (IA3's
    # feedforward_modules per model_type) before targets are resolved.
    prepare_config: Callable[..., None] | None = None


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    _REGISTRY[method.peft_type] = method
    return method


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for info in pkgutil.iter_modules(__path__):
            if info.ispkg:
                importlib.import_module(f"{__name__}.{info.name}")


def get_method(peft_type: str) -> Method:
    _load_all()
    if peft_type not in _REGISTRY:
        raise ValueError(f"Unknown peft_type {peft_type!r}; peftkit supports {sorted(_REGISTRY)}")
    return _REGISTRY[peft_type]


def all_methods() -> dict[str, Method]:
    _load_all()
    return dict(_REGISTRY)
