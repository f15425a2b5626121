"""DoRA (weight-decomposed LoRA): W' = m * (W + s B A) / ||W + s B A||_row.

As in PEFT (and the DoRA paper, sec. 4.3) the norm is treated as a constant in backward;
it comes from `kernels.dora_weight_norm`, which never forms W + s B A.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dora_linear(
    x: torch.Tensor,
    result: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout,
    norm: torch.Tensor,
) -> torch.Tensor:
    """Add DoRA's correction to `result = base(x)`; `weight` is [out, in], `norm` [out].

    The plain path, step for step as PEFT computes it: with dropout active the base term is
    recomputed on the dropped input.
    """
    mag_scale = (magnitude / norm.to(magnitude.dtype)).view(*([1] * (x.dim() - 1)), -1)
    if dropout is None or not dropout.training or dropout.p == 0:
        base_result = result if bias is None else result - bias
        x_in = x
    else:
        x_in = dropout(x)
        base_result = F.linear(x_in, weight.to(x_in.dtype))
    x_in = x_in.to(lora_A.dtype)
    lora_result = F.linear(F.linear(x_in, lora_A), lora_B)
    out = result + (mag_scale - 1) * base_result + mag_scale * lora_result * scaling
    return out.to(result.dtype)
