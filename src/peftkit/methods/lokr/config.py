"""LoKrConfig: PEFT's field names, defaults and JSON spelling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..lycoris import LycorisConfig, _is_int


@dataclass
class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product: delta_W = (alpha / r) * kron(w1, w2).

    With out = a * b and in = c * d split by `factorization(dim, decompose_factor)`, w1 is [a, c]
    and w2 is [b, d]; w2 (and w1 when `decompose_both`) becomes a rank-r product when r is below
    half its larger side. `init_weights`: True (w1 = 0), "lycoris" (w2 = 0) or False (all random).
    `rank_dropout_scale` rescales rank dropout by the kept fraction. Other fields as in LoHaConfig.
    """

    peft_type: ClassVar[str] = "LOKR"
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    def _init_choices(self) -> tuple:
        return (True, False, "lycoris")

    def problems(self) -> list[str]:
        out = super().problems()
        if not _is_int(self.decompose_factor) or not (self.decompose_factor == -1 or self.decompose_factor > 0):
            out.append(f"decompose_factor={self.decompose_factor!r} must be -1 (near square root) or a positive integer")
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name}={getattr(self, name)!r} must be True or False")
        return out
