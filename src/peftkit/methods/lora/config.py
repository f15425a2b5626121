"""LoraConfig: PEFT's field names, defaults and JSON spelling."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import PeftConfig
from .init import init_problem

BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: W x + (alpha / r) * B A x, with A [r, in] and B [out, r].

    `target_modules`: list of names (exact or `.name` suffix), a full-match regex string, or
    "all-linear"; None picks the architecture's default.

    `init_lora_weights`: True (A kaiming-uniform, B = 0), False (both random: the adapter is not
    a no-op), "gaussian" (A ~ N(0, 1/r^2), B = 0), "pissa" / "pissa_niter_[N]" (principal singular
    vectors, full or randomized SVD with N subspace iterations) or "olora" (QR). PiSSA and OLoRA
    CHANGE THE BASE WEIGHTS, as in PEFT: the principal part moves into A and B and the base keeps
    the residual, so the fresh model's output is unchanged. Loading an adapter whose config says
    pissa/olora re-runs the decomposition on the base it is loaded onto (PEFT does the same), so
    load it onto the ORIGINAL base; a model saved after the change already holds the residual and
    needs the adapter's config set to `init_lora_weights=True`. Embeddings get the default init.
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
        init_issue = init_problem(self.init_lora_weights)
        if init_issue:
            out.append(init_issue)
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
