"""DoRA (weight-decomposed LoRA): W' = m * (W + s B A) / ||W + s B A||_row.

As in PEFT (and the DoRA paper, sec. 4.3) the norm is treated as a constant in backward;
it comes from `kernels.dora_weight_norm`, which never forms W + s B A.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels import dora_weight_norm, lora_linear, weight_row_sq_norm
from ...kernels._dispatch import compute_dtype
from ...kernels.lora_linear import branch_dtype, lora_dropout
from .variants import LoraVariant


class DoraMagnitude(nn.Module):
    """Holds m as `.weight`, so parameter names are peft's (`lora_magnitude_vector.<adapter>.weight`,
    peft's DoraLinearLayer); the saved key drops the `.weight`, as peft's files do."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class DoraVariant(LoraVariant):
    """DoRA on a LoRA `Linear` (nn.Linear or Conv1D).

    The norm ||W + s B A|| per row is cached: ||W||^2 for as long as the base is unchanged (it
    is frozen; `reset` on merge/unmerge), the whole norm in eval mode, keyed by A's and B's versions.
    """

    def __init__(self) -> None:
        self.reset()
        self._merge_norm: torch.Tensor | None = None

    def reset(self) -> None:
        self._base_sq_norm = None
        self._cached: tuple | None = None

    def init(self, layer, name) -> None:
        """m starts as the row norm of the initial W + s B A, so a fresh adapter leaves the output as is."""
        layer.lora_magnitude_vector[name] = DoraMagnitude(self.norm(layer, name).clone())

    def norm(self, layer, name) -> torch.Tensor:
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        key = (lora_A._version, lora_B._version)
        if not layer.training and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        # A quantized base is dequantized for it on every call, as peft does (nothing kept).
        fan_in_fan_out = layer.fan_in_fan_out and not layer.quantized
        weight = layer.weight_out_in() if layer.quantized else layer.base_layer.weight
        if self._base_sq_norm is None:
            self._base_sq_norm = weight_row_sq_norm(weight, fan_in_fan_out)
        norm = dora_weight_norm(weight, lora_A, lora_B, layer.scaling[name], self._base_sq_norm, fan_in_fan_out)
        if not layer.training:
            self._cached = (key, norm)
        return norm

    def delta_weight(self, layer, name, delta) -> torch.Tensor:
        weight = layer.weight_out_in().float()
        scale = (layer.lora_magnitude_vector[name].weight.float() / self.norm(layer, name)).unsqueeze(1)
        return scale * (weight + delta) - weight

    def before_merge(self, layer, name) -> None:
        """DoRA's delta depends on the weight it is merged into: keep the norm for `unmerge`."""
        self._merge_norm = self.norm(layer, name)

    @torch.no_grad()
    def unmerge(self, layer, name) -> None:
        """Invert the merge's scale with the norm recorded at merge time."""
        merged = layer.weight_out_in().float()
        scale = (layer.lora_magnitude_vector[name].weight.float() / self._merge_norm).unsqueeze(1)
        lora = (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
        layer.store_weight_out_in(merged / scale - lora)
        self._merge_norm = None

    def fused_forward(self, layer, name, x) -> torch.Tensor | None:
        """m / ||W + sBA|| * (x W^T + s x A^T B^T) + b: the fused LoRA node scaled per output row.

        As in peft the scale multiplies in fp32 (the branch dtype) and the result is rounded
        once: rounded to bf16 first, a scale near 1 would move in steps of 2^-8 and ignore small
        updates of the magnitude. PEFT's DoRA with dropout recomputes the base on the dropped
        input; that case keeps the plain path.
        """
        if layer._dropout_p(name) > 0:
            return None
        weight, bias = layer.base_layer.weight, layer.base_layer.bias
        lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
        magnitude = layer.lora_magnitude_vector[name].weight
        wide = torch.promote_types(branch_dtype(x, lora_A, lora_B), magnitude.dtype)
        out = lora_linear(x, weight, None, lora_A, lora_B, layer.scaling[name], 0.0, False, layer.fan_in_fan_out,
                          out_dtype=wide)
        out = out * (magnitude / self.norm(layer, name)).to(wide)
        if bias is not None:
            out = out + bias.to(wide)
        return out.to(compute_dtype(x))

    def forward(self, layer, name, x, result) -> torch.Tensor:
        # The weight is only read to recompute the base on a dropped input (dequantizing costs).
        weight = layer.weight_out_in() if layer._dropout_p(name) > 0 else None
        return dora_linear(x, result, weight, layer.base_layer.bias, layer.lora_A[name].weight,
                           layer.lora_B[name].weight, layer.lora_magnitude_vector[name].weight, layer.scaling[name],
                           layer._dropout_p(name), norm=self.norm(layer, name))


def dora_linear(
    x: torch.Tensor,
    result: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    norm: torch.Tensor,
) -> torch.Tensor:
    """`result` (= base(x), plus any earlier adapters) plus DoRA's correction; `weight` is
    [out, in] (read only with dropout, else may be None), `norm` [out].

    The plain path, step for step as PEFT computes it: x is cast to lora_A's dtype (fp32 for
    fp32 adapters) and the correction, scale included, is computed in that dtype; the sum comes
    back in the promoted dtype, for the caller to round once. With dropout (`dropout_p` > 0,
    training only) the base term is recomputed on the dropped input, with `lora_dropout`'s mask
    (the fused op's).
    """
    mag_scale = (magnitude / norm.to(magnitude.dtype)).view(*([1] * (x.dim() - 1)), -1)
    x_in = x.to(lora_A.dtype)
    if dropout_p <= 0:
        base_result = result if bias is None else result - bias
    else:
        x_in = lora_dropout(x_in, dropout_p)
        base_result = F.linear(x_in, weight.to(x_in.dtype))
    lora_result = F.linear(F.linear(x_in, lora_A), lora_B)
    return result + (mag_scale - 1) * base_result + mag_scale * lora_result * scaling
