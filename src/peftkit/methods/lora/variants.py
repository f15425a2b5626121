"""LoRA variants as strategy objects (DESIGN: "Layers of the house").

A LoRA `Linear` holds one variant per adapter (`layer.lora_variant[name]`, as peft's LoRA
layer does) and calls its hooks wherever a variant could differ from plain LoRA, so that a
variant (DoRA, a quantized base, ...) is one class, not branches spread through the layer.
`LoraVariant` is plain LoRA: the default every hook falls back to.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import lora_linear
from ...kernels.lora_linear import lora_dropout


class LoraVariant:
    """Plain LoRA: y = base(x) + s · B A dropout(x). One instance per adapter of a layer, so a
    variant may keep per-adapter state (caches) on itself."""

    def init(self, layer: nn.Module, name: str) -> None:
        """After A and B of `name` are created, initialised and moved to the base's device."""

    def reset(self) -> None:
        """The base weight changed (merge, unmerge, an init that rewrites it): drop what was
        derived from it."""

    def delta_weight(self, layer: nn.Module, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The merged change to the weight, given the plain s·BA (fp32, [out, in])."""
        return delta

    def before_merge(self, layer: nn.Module, name: str) -> None:
        """Called just before `get_delta_weight(name)` is added to the base weight."""

    @torch.no_grad()
    def unmerge(self, layer: nn.Module, name: str) -> None:
        """Take the merged adapter out of the base weight again."""
        if layer.quantized:
            layer.store_weight_out_in(layer.weight_out_in() - layer.get_delta_weight(name))
            return
        weight = layer.base_layer.weight
        weight.data -= layer.get_delta_weight(name).to(weight.dtype)

    def fused_forward(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Base and adapter as one fused node (`kernels.lora_linear`), or None where that does
        not apply and the layer takes the plain path."""
        if isinstance(layer.scaling[name], torch.Tensor):  # hotswap-ready (methods/lora/hotswap.py): a graph input
            return None
        base = layer.base_layer
        return lora_linear(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                           layer.scaling[name], layer._dropout_p(name), layer.training, layer.fan_in_fan_out)

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The plain path: `result` (base output, plus earlier adapters) plus this adapter's
        branch, computed as peft does in the adapters' dtype; the caller rounds the sum once.
        The dropout mask is the fused op's (`lora_dropout`), so fast paths off reproduce a run."""
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        x_in = lora_dropout(x.to(lora_A.dtype), layer._dropout_p(name))
        return result + F.linear(F.linear(x_in, lora_A), lora_B) * layer.scaling[name]
