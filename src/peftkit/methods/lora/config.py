"""LoraConfig: PEFT's field names, defaults and JSON spelling."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import PeftConfig

INIT_CHOICES = (True, False, "gaussian")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: W x + (alpha / r) * B A x, with A [r, in] and B [out, r].

    `target_modules`: list of names (exact or `.name` suffix), a full-match regex string, or
    "all-linear"; None picks the architecture's default.
    """

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            out.append(f"r={self.r!r} must be a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            out.append(f"lora_alpha={self.lora_alpha!r} must be a number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"lora_dropout={self.lora_dropout!r} must be a number in [0, 1)")
        if self.bias not in BIAS_CHOICES:
            out.append(f"bias={self.bias!r} is not one of {list(BIAS_CHOICES)}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in INIT_CHOICES):
            out.append(f"init_lora_weights={self.init_lora_weights!r} is not one of {list(INIT_CHOICES)}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            out.append(f"target_modules={self.target_modules!r} must be a list of names, a regex string or 'all-linear'")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            out.append("layers_to_transform only works with a list of target_modules, not a regex string")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            out.append(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                out.append(f"{name}={pattern!r} must be a dict of module-name pattern -> value")
        return out
