"""Mixed-adapter batches for LoRA layers: each row of the batch goes through its own adapter.

`adapter_names` holds one adapter name per row (or "__base__" for the base model alone), as in
peft's `model(..., adapter_names=[...])`. The base layer runs once on the whole batch; each
adapter's branch runs on its rows only and is added to those rows, so a row's output is the one
it would get with its adapter set alone. The model-level plumbing (validation, the hooks that
pass `adapter_names` down to the layers) is `peftkit.mixed_adapters`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import row_groups

BASE = "__base__"


def check_rows(layer: nn.Module, x: torch.Tensor, adapter_names: list[str]) -> None:
    """peft's checks: one name per row, no merged adapter, no DoRA adapter among the names."""
    if len(x) != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch reaching "
                         f"{type(layer).__name__} has {len(x)} rows; give one adapter name (or '__base__') per row")
    if layer.merged:
        raise ValueError(f"adapter_names= cannot be used while adapters {layer.merged_adapters} are merged into the "
                         f"base weights; call unmerge_adapter() first")
    dora = sorted({n for n in adapter_names if layer.use_dora.get(n, False)})
    if dora:
        raise ValueError(f"adapter_names= (a mixed-adapter batch) does not support DoRA adapters (use_dora=True): "
                         f"{dora}")


def linear_forward(layer: nn.Module, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
    """LoRA Linear / Conv1D: base(x) for every row plus each row's adapter branch (the adapter's
    variant computes it, in the adapter's dtype; the row is rounded to the base dtype once)."""
    check_rows(layer, x, adapter_names)
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name, rows in row_groups(adapter_names, x.device):
        if name == BASE or name not in layer.lora_A:
            continue
        result[rows] = layer.lora_variant[name].forward(layer, name, x[rows], result[rows]).to(dtype)
    return result


def embedding_forward(layer: nn.Module, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
    """LoRA Embedding: the base lookup for every row plus each row's A-lookup times B."""
    check_rows(layer, x, adapter_names)
    result = layer.base_layer(x, *args, **kwargs)
    base = layer.base_layer
    for name, rows in row_groups(adapter_names, x.device):
        if name == BASE or name not in layer.lora_embedding_A:
            continue
        after_a = F.embedding(x[rows], layer.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        branch = (after_a @ layer.lora_embedding_B[name].T) * layer.scaling[name]
        result[rows] = result[rows] + branch.to(result.dtype)
    return result


def conv2d_forward(layer: nn.Module, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> torch.Tensor:
    """LoRA Conv2d: the base conv for every image plus each image's adapter branch."""
    check_rows(layer, x, adapter_names)
    result = layer.base_layer(x, *args, **kwargs)
    for name, rows in row_groups(adapter_names, x.device):
        if name == BASE or name not in layer.lora_A:
            continue
        x_in = layer.lora_dropout[name](x[rows]).to(layer.lora_A[name].weight.dtype)
        branch = layer.lora_B[name](layer.lora_A[name](x_in)) * layer.scaling[name]
        result[rows] = result[rows] + branch.to(result.dtype)
    return result
