"""Put adapter layers into a model (replacing target modules on their parents) and take them out."""
from __future__ import annotations

import torch.nn as nn

from .methods import Method
from .methods.base import AdapterLayer, ModulesToSaveWrapper
from .targeting import matches_target, modules_to_save_names, resolve_targets, targetable_names


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _inside_adapter_layer(path: str, layer_paths: list[str]) -> bool:
    return any(path.startswith(p + ".") for p in layer_paths)


def inject_adapter(model: nn.Module, method: Method, config, adapter_name: str) -> list[str]:
    """Wrap every module `config` targets; returns the adapted module paths.

    Resolves `target_modules` (None / "all-linear") into names and writes them back to the
    config, as PEFT does, so the saved config says exactly what was adapted.
    """
    if method.prepare_config is not None:
        method.prepare_config(model, config)
    config.target_modules = resolve_targets(model, config, method.default_targets)
    modules = list(model.named_modules())
    layer_paths = [p for p, m in modules if isinstance(m, AdapterLayer)]
    adapted, unsupported = [], []
    for path, module in modules:
        if not path or _inside_adapter_layer(path, layer_paths) or not matches_target(config, path):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            continue
        layer = method.create_layer(module, path, config, adapter_name)
        if layer is None:
            unsupported.append(f"{path} ({type(module).__name__})")
            continue
        layer.train(module.training)  # new adapter parts follow the model's train/eval mode
        if layer is not module:
            set_submodule(model, path, layer)
        adapted.append(path)
    if unsupported:
        raise ValueError(
            f"target_modules={config.target_modules!r} selects modules that {method.peft_type} cannot adapt: "
            f"{unsupported}. Supported module types: {list(method.supported_types)}."
        )
    if not adapted:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model"
            + _filters_note(config)
            + f". Module names that exist: {targetable_names(model)}"
        )
    add_modules_to_save(model, config.modules_to_save or [], adapter_name)
    return adapted


def _filters_note(config) -> str:
    notes = []
    for name in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        value = getattr(config, name, None)
        if value not in (None, [], ""):
            notes.append(f"{name}={value!r}")
    return f" (with {', '.join(notes)})" if notes else ""


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> None:
    if not names:
        return
    wrapped = [p for p, m in model.named_modules() if isinstance(m, AdapterLayer)]
    for path in modules_to_save_names(model, names):
        if _inside_adapter_layer(path, wrapped):
            continue
        module = model.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            if adapter_name not in module.modules_to_save:
                module.add_copy(adapter_name)
        elif not isinstance(module, AdapterLayer):
            set_submodule(model, path, ModulesToSaveWrapper(module, adapter_name))
            wrapped.append(path)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdapterLayer)]


def eject_layers(model: nn.Module, merge: bool, only_empty: bool = False, safe_merge: bool = False,
                 adapter_names: list[str] | None = None) -> None:
    """Replace adapter layers by their base module (merging first when `merge`).

    `only_empty` ejects just the layers that no longer hold any adapter.
    """
    for path, layer in adapter_layers(model):
        if only_empty and layer.adapter_names:
            continue
        if isinstance(layer, ModulesToSaveWrapper):
            replacement = layer.active_module() if merge else layer.base_layer
        else:
            if merge:
                layer.merge(adapter_names, safe_merge=safe_merge)
            replacement = layer.base_layer
        set_submodule(model, path, replacement)
