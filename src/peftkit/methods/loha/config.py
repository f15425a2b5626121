"""LoHaConfig: PEFT's field names, defaults and JSON spelling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..lycoris import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product: delta_W = (alpha / r) * (w1_a w1_b) * (w2_a w2_b).

    `target_modules`: list of names (exact or `.name` suffix), a full-match regex string, or
    "all-linear"; None picks the architecture's default (LoRA's table, as in PEFT).
    `rank_dropout` zeroes random output rows of delta_W while training (rescaled by the kept
    fraction); `module_dropout` skips the whole adapter with that probability while training.
    `use_effective_conv2d`: CP-decomposed factors for Conv2d kernels larger than 1x1.
    `init_weights=False` makes every factor random (a non-zero initial delta).
    """

    peft_type: ClassVar[str] = "LOHA"
