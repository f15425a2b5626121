"""Translation between a model's adapter modules and PEFT's flat key names.

A key is `base_model.model.<module path>.<local key>`, where the local key is what the
adapter layer reports (`lora_A.weight`, `lora_embedding_A`, `lora_magnitude_vector`, ...),
with the adapter name removed. This module is the only place that builds key strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .layer_protocol import SavedAdapterLayer

PREFIX = "base_model.model."


@dataclass
class LoadReport:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        if self.missing_keys:
            parts.append(f"missing keys (left at their initial values): {self.missing_keys}")
        if self.unexpected_keys:
            parts.append(f"unexpected keys (ignored): {self.unexpected_keys}")
        return "; ".join(parts) or "all keys matched"


def _adapter_layers(model: nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, SavedAdapterLayer):
            yield path, module


def trained_bias_params(model: nn.Module, bias: str):
    """(path, tensor) of biases that are trained under PEFT's `bias` setting."""
    if bias == "all":
        copies = [path + "." for path, m in model.named_modules()
                  if isinstance(m, SavedAdapterLayer) and m.saves_whole_module]
        for path, module in model.named_modules():
            b = module._parameters.get("bias")
            if b is not None and not any(path.startswith(c) for c in copies):
                yield f"{path}.bias", b
    elif bias == "lora_only":
        for path, layer in _adapter_layers(model):
            if layer.saves_whole_module:
                continue  # a whole-module copy is trained and saved by itself
            b = getattr(layer.base_layer, "bias", None)
            if isinstance(b, nn.Parameter):
                yield f"{path}.base_layer.bias", b


def collect_adapter_state(model: nn.Module, adapter_name: str, bias: str = "none",
                          extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter under its PEFT key. `extra` holds model-level tensors
    (e.g. prompt embeddings) that are saved under their own plain key."""
    state = {}
    for path, layer in _adapter_layers(model):
        for local, tensor in layer.adapter_state(adapter_name).items():
            state[f"{PREFIX}{path}.{local}"] = tensor
    for path, tensor in trained_bias_params(model, bias):
        state[f"{PREFIX}{path}"] = tensor.data
    state.update(extra or {})
    return state


def load_adapter_weights(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor], bias: str = "none",
                         extra: dict[str, torch.Tensor] | None = None) -> LoadReport:
    """Copy `state` (PEFT keys) into the adapter `adapter_name` in place.

    Raises on a shape mismatch (naming the module and both shapes); reports missing and
    unexpected keys. `extra` maps plain keys to model-level tensors to fill.
    """
    report = LoadReport()
    remaining = dict(state)
    for path, layer in _adapter_layers(model):
        prefix = f"{PREFIX}{path}."
        local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = layer.adapter_state(adapter_name)
        if not own:
            continue
        for key in own:
            remaining.pop(prefix + key, None)
        report.missing_keys += [prefix + k for k in layer.load_adapter_state(adapter_name, local, where=path)]
        _load_saved_embedding_base(layer, prefix, remaining)
    with torch.no_grad():
        for path, tensor in trained_bias_params(model, bias):
            key = f"{PREFIX}{path}"
            if key in remaining:
                copy_checked(tensor, remaining.pop(key), key)
            else:
                report.missing_keys.append(key)
        for key, tensor in (extra or {}).items():
            if key in remaining:
                copy_checked(tensor, remaining.pop(key), key)
            else:
                report.missing_keys.append(key)
    report.unexpected_keys = sorted(remaining)
    return report


def _load_saved_embedding_base(layer: SavedAdapterLayer, prefix: str, remaining: dict) -> None:
    """PEFT saves the whole embedding matrix next to an embedding adapter (`base_layer.weight`),
    for vocabularies resized during fine-tuning; load it into the base layer."""
    key = f"{prefix}base_layer.weight"
    if key in remaining and isinstance(layer.base_layer, nn.Embedding):
        with torch.no_grad():
            copy_checked(layer.base_layer.weight, remaining.pop(key), key)


def copy_checked(target: torch.Tensor, source: torch.Tensor, key: str, layout: str | None = None) -> None:
    """Copy a saved tensor into the model's `target` in place; a shape mismatch raises naming
    `key`, both shapes and (if given) the expected `layout`, e.g. "[num_virtual_tokens, token_dim]"."""
    if tuple(target.shape) != tuple(source.shape):
        hint = f" ({layout})" if layout else ""
        raise ValueError(f"Shape mismatch for {key}: the model expects {tuple(target.shape)}{hint} "
                         f"but the adapter file has {tuple(source.shape)}")
    with torch.no_grad():
        target.data.copy_(source.to(device=target.device, dtype=target.dtype))


# --- prompt learning -----------------------------------------------------------------------------
PROMPT_KEY = "prompt_embeddings"
# PEFT's prompt-learning models wrap the transformers model directly (no tuner in between), so
# modules_to_save copies are saved as `base_model.<path>` rather than `base_model.model.<path>`.
PROMPT_LEARNING_PREFIX = "base_model."


def _to_layer_key(key: str) -> str:
    return PREFIX + key[len(PROMPT_LEARNING_PREFIX):] if key.startswith(PROMPT_LEARNING_PREFIX) else key


def _to_prompt_key(key: str) -> str:
    return PROMPT_LEARNING_PREFIX + key[len(PREFIX):] if key.startswith(PREFIX) else key


def collect_prompt_learning_state(model: nn.Module, adapter_name: str, embeddings: torch.Tensor) -> dict:
    """One prompt-learning adapter's tensors under PEFT's keys: `prompt_embeddings` plus any
    modules_to_save copy (e.g. the classifier head, as `base_model.classifier.weight`)."""
    state = {_to_prompt_key(k): v for k, v in collect_adapter_state(model, adapter_name).items()}
    state[PROMPT_KEY] = embeddings
    return state


def load_prompt_learning_weights(model: nn.Module, adapter_name: str,
                                 state: dict) -> tuple[LoadReport, torch.Tensor | None]:
    """Copy a PEFT prompt-learning state's modules_to_save copies into the model; returns the
    report (missing and unexpected keys in the file's spelling; shape mismatches raise) and the
    saved `prompt_embeddings` (None when missing) for the encoder to load."""
    layers = {_to_layer_key(k): v for k, v in state.items() if k != PROMPT_KEY}
    report = load_adapter_weights(model, adapter_name, layers)
    report.missing_keys = [_to_prompt_key(k) for k in report.missing_keys]
    report.unexpected_keys = sorted(_to_prompt_key(k) for k in report.unexpected_keys)
    if PROMPT_KEY not in state:
        report.missing_keys.append(PROMPT_KEY)
    return report, state.get(PROMPT_KEY)
