"""DoRA (weight-decomposed LoRA): W' = m * (W + s B A) / ||W + s B A||_row.

As in PEFT (and the DoRA paper, sec. 4.3) the norm is treated as a constant in backward;
it comes from `kernels.dora_weight_norm`, which never forms W + s B A.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.lora_linear import lora_dropout


def dora_linear(
    x: torch.Tensor,
    result: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    norm: torch.Tensor,
) -> torch.Tensor:
    """`result` (= base(x), plus any earlier adapters) plus DoRA's correction; `weight` is
    [out, in], `norm` [out].

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
