"""What LoHa and LoKr share (PEFT's "LyCORIS" family): config fields, per-adapter rank/alpha,
module and rank dropout, and an additive forward `base(x) + delta(x)`."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PeftConfig
from .base import AdapterLayer


@dataclass
class LycorisConfig(PeftConfig):
    """Shared fields; `scaling = alpha / r` per layer, `rank_pattern` / `alpha_pattern` override r /
    alpha for module paths whose end matches the pattern (first match wins, as in PEFT)."""

    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        super().__post_init__()

    def _init_choices(self) -> tuple:
        return (True, False)

    def problems(self) -> list[str]:
        out = super().problems()
        if not _is_int(self.r) or self.r <= 0:
            out.append(f"r={self.r!r} must be a positive integer")
        if not _is_number(self.alpha):
            out.append(f"alpha={self.alpha!r} must be a number")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                out.append(f"{name}={value!r} must be a probability in [0, 1]")
        if not isinstance(self.use_effective_conv2d, bool):
            out.append(f"use_effective_conv2d={self.use_effective_conv2d!r} must be True or False")
        if self.init_weights not in self._init_choices() or not isinstance(self.init_weights, (bool, str)):
            out.append(f"init_weights={self.init_weights!r} is not one of {list(self._init_choices())}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                out.append(f"{name}={value!r} must be a list of module names, a regex string or 'all-linear'")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            out.append("layers_to_transform only works with a list of target_modules, not a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            out.append(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform")
        for name, pattern, check, what in (("rank_pattern", self.rank_pattern, _is_positive_int, "a positive integer"),
                                           ("alpha_pattern", self.alpha_pattern, _is_number, "a number")):
            if not isinstance(pattern, dict):
                out.append(f"{name}={pattern!r} must be a dict of module-name pattern -> value")
                continue
            bad = {k: v for k, v in pattern.items() if not check(v)}
            if bad:
                out.append(f"{name} values must each be {what}; got {bad}")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            out.append(f"modules_to_save={self.modules_to_save!r} must be a list of module names (or None)")
        return out

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """(r, alpha) for the module at path `key`, after rank_pattern / alpha_pattern."""
        return _pattern_value(self.rank_pattern, key, self.r), _pattern_value(self.alpha_pattern, key, self.alpha)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pattern_value(patterns: dict, key: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


class LycorisLayer(AdapterLayer):
    """Base of LoHa / LoKr layers: subclasses build `delta_output(name, x)` (the adapter's term
    before rank dropout) and `get_delta_weight(name)` (same shape as `base_layer.weight`)."""

    adapter_settings = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        # Which parameter containers an adapter uses depends on its shape, so list names by setting.
        return list(self.scaling)

    def _set_hyper(self, name: str, r: int, alpha: float, rank_dropout: float, module_dropout: float) -> None:
        if not _is_positive_int(r):
            raise ValueError(f"r={r!r} for adapter {name!r} must be a positive integer")
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name], self.module_dropout[name] = rank_dropout, module_dropout

    def _new_parameter(self, name: str, attr: str, *shape: int) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, device=self.base_layer.weight.device))
        getattr(self, attr)[name] = param
        return param

    def rescale_rank_dropout(self, name: str) -> bool:
        return True

    def _rank_drop(self, name: str, channels: int, like: torch.Tensor) -> torch.Tensor | None:
        """Training-time mask over output channels [channels] (None when off), drawn as PEFT draws it."""
        p = self.rank_dropout[name]
        if not (self.training and p):
            return None
        drop = (torch.rand(channels) > p).to(like.dtype)
        if self.rescale_rank_dropout(name):
            mean = drop.mean()
            drop = drop / mean if mean > 0 else drop
        return drop.to(like.device)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to `base_layer(x)` (rank dropout applied); per layer type."""
        raise NotImplementedError(f"{type(self).__name__} must define delta_output")

    def _conv2d_delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Conv2d delta: build delta_W [out, in/groups, kh, kw] and convolve like the base layer."""
        weight = self.get_delta_weight(name)
        drop = self._rank_drop(name, weight.shape[0], weight)
        if drop is not None:
            weight = weight * drop.view(-1, 1, 1, 1)
        base = self.base_layer
        return F.conv2d(x.to(weight.dtype), weight, None, base.stride, base.padding, base.dilation, base.groups)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            # PEFT draws the module-dropout coin on every training step, before rank dropout; the
            # same order keeps seeded runs of both libraries identical.
            if self.training and not bool(torch.rand(1) > self.module_dropout[name]):
                continue
            # As peft: the delta (fp32 for fp32 masters) joins the base output unrounded and the
            # sum is rounded once; rounding the delta first costs precision in bf16/fp16.
            result = result + self.delta_output(name, x)
        return result.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def check_conv_padding(module: nn.Module, key: str) -> None:
    """The delta runs as F.conv2d with zero padding; other padding modes would silently differ."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"{key} is an nn.Conv2d with padding_mode={module.padding_mode!r}; LoHa/LoKr support "
                         f"only padding_mode='zeros'. Exclude it via exclude_modules.")


def wrap_module(module: nn.Module, key: str, adapter_name: str, settings: dict,
                linear_cls: type, conv_cls: type) -> nn.Module | None:
    """Add adapter `adapter_name` to `module` (at path `key`): update a layer of this method in
    place, or wrap an nn.Linear / nn.Conv2d; None for any other module type."""
    if isinstance(module, (linear_cls, conv_cls)):
        module.update_layer(adapter_name, **settings)
        return module
    if isinstance(module, nn.Linear):
        layer = linear_cls(module)
    elif isinstance(module, nn.Conv2d):
        check_conv_padding(module, key)
        layer = conv_cls(module)
    else:
        return None
    layer.update_layer(adapter_name, **settings)
    return layer


def cp_rebuild(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] from a core t [r, r, kh, kw] and mode factors w_a [r, out], w_b [r, in]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)
