"""torch.compile for the repeated blocks of a model (decoder layers), not the whole model.

Compiling each decoder layer instead of the model keeps the parts that do not trace well
outside the graphs (the loss with its data-dependent row filtering, the embedding and mask
set-up, generation), and the layers of one class share one compiled graph: torch.compile
treats module parameters as inputs, so 32 identical layers compile once. `nn.Module.compile`
compiles in place, so parameter names, state_dict keys and adapter save/load are unchanged.

LoRA layers with the fused op (`lora_linear`), with or without dropout, and the attention
kernel that PeftModel routes transformers' SDPA to (`kernels.attention`) trace without graph
breaks; the dropout mask and the attention are opaque custom ops inside the graph.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["compile_decoder_layers", "find_decoder_layers"]


def _backbone(model: nn.Module) -> nn.Module:
    """The module holding the layer stack, found by following `base_model` down: a peftkit
    PeftModel -> its transformers model -> that model's backbone (e.g. LlamaForCausalLM.model),
    which is its own `base_model`. A module without `base_model` is its own backbone."""
    for _ in range(4):
        inner = getattr(model, "base_model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks of every `nn.ModuleList` child of the backbone whose elements all share one
    class (e.g. `model.model.layers` for Llama, `model.transformer.h` for GPT-2)."""
    backbone = _backbone(model)
    layers: list[nn.Module] = []
    for child in backbone.children():
        if isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1:
            layers.extend(child)
    return layers


def compile_decoder_layers(model: nn.Module, **compile_kwargs) -> int:
    """Apply `torch.compile(**compile_kwargs)` in place to each decoder layer; returns how many.

    model: a peftkit PeftModel, a transformers model or its backbone. Compilation happens
    lazily on the first forward (expect tens of seconds per distinct layer class on CPU).
    Raises ValueError when no layer stack is found.
    """
    layers = find_decoder_layers(model)
    if not layers:
        backbone = _backbone(model)
        children = [f"{name} ({type(m).__name__})" for name, m in backbone.named_children()]
        raise ValueError(
            f"compile_decoder_layers: {type(backbone).__name__} has no nn.ModuleList child whose elements "
            f"share one class (its children: {children}); pass a transformers model or a PeftModel wrapping one"
        )
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
