"""LoKr (low-rank Kronecker product) on nn.Linear and nn.Conv2d.

delta_W = scaling * kron(w1, w2), out = a * b, in = c * d:
  w1: lokr_w1 [a, c], or lokr_w1_a [a, r] @ lokr_w1_b [r, c] (decompose_both and r small)
  w2: lokr_w2 [b, d (, kh, kw)], or lokr_w2_a [b, r] @ lokr_w2_b [r, d * kh * kw] (r small), or for
      Conv2d with use_effective_conv2d a CP form lokr_t2 [r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d].
Names, shapes and the factorisation are PEFT's.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import quantized_base
from ..lycoris import LycorisLayer, cp_rebuild


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n == dimension (PEFT's / LyCORIS' rule).

    A positive `factor` that divides `dimension` gives (factor, dimension // factor). Otherwise
    walk the divisors upwards from 1 while they stay <= `factor` (any size for -1) and the pair
    has not yet crossed the square root, so -1 gives the divisor pair nearest the square root.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if next_m > limit:
            break
        m, n = next_m, dimension // next_m
    return min(m, n), max(m, n)


class LoKrLayer(LycorisLayer):
    adapter_containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    adapter_settings = LycorisLayer.adapter_settings + ("rank_dropout_scale",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_containers:
            setattr(self, attr, nn.ParameterDict())
        self.rank_dropout_scale: dict[str, bool] = {}

    def _dims(self) -> tuple[int, int, tuple[int, ...]]:
        """(out, in per group, kernel size; () for a matrix)."""
        raise NotImplementedError(f"{type(self).__name__} must define _dims")

    def update_layer(self, name: str, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                     init_weights: bool | str = True, use_effective_conv2d: bool = False,
                     decompose_both: bool = False, decompose_factor: int = -1,
                     rank_dropout_scale: bool = False) -> None:
        self._set_hyper(name, r, alpha, rank_dropout, module_dropout)
        self.rank_dropout_scale[name] = rank_dropout_scale
        out_dim, in_dim, kernel = self._dims()
        a, b = factorization(out_dim, decompose_factor)
        c, d = factorization(in_dim, decompose_factor)
        if decompose_both and r < max(a, c) / 2:
            self._new_parameter(name, "lokr_w1_a", a, r)
            self._new_parameter(name, "lokr_w1_b", r, c)
        else:
            self._new_parameter(name, "lokr_w1", a, c)
        if r >= max(b, d) / 2:
            self._new_parameter(name, "lokr_w2", b, d, *kernel)
        elif use_effective_conv2d and kernel not in ((), (1, 1)):  # a 1x1 kernel is a plain matrix
            self._new_parameter(name, "lokr_w2_a", r, b)
            self._new_parameter(name, "lokr_w2_b", r, d)
            self._new_parameter(name, "lokr_t2", r, r, *kernel)
        else:
            self._new_parameter(name, "lokr_w2_a", b, r)
            self._new_parameter(name, "lokr_w2_b", r, d * math.prod(kernel))
        self._init(name, init_weights)

    def _init(self, name: str, init_weights: bool | str) -> None:
        # One factor at zero makes the initial delta zero: w1 side by default, w2 side "lycoris".
        if init_weights == "lycoris":
            zeros = {"lokr_w2", "lokr_w2_b"}
        elif init_weights:
            zeros = {"lokr_w1", "lokr_w1_a"}
        else:
            zeros = set()
        for attr in self.adapter_containers:  # PEFT's order, so that equal seeds give equal weights
            if name in getattr(self, attr):
                param = getattr(self, attr)[name]
                if attr in zeros:
                    nn.init.zeros_(param)
                else:
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    def rescale_rank_dropout(self, name: str) -> bool:
        return self.rank_dropout_scale[name]

    def kron_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 [a, c] and w2 ([b, d], [b, d * kh * kw] or [b, d, kh, kw])."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = cp_rebuild(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def get_delta_weight(self, name: str) -> torch.Tensor:
        w1, w2 = self.kron_factors(name)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        shape = quantized_base.weight_shape(self.base_layer)
        return (torch.kron(w1, w2.contiguous()) * self.scaling[name]).reshape(shape)


class LoKrLinear(LoKrLayer):
    """LoKr on nn.Linear; the delta is applied factor by factor, never as an [out, in] matrix."""

    def _dims(self) -> tuple[int, int, tuple[int, ...]]:
        out_dim, in_dim = quantized_base.weight_shape(self.base_layer)
        return out_dim, in_dim, ()

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.kron_factors(name)
        (a, c), (b, d) = w1.shape, w2.shape
        # kron(w1, w2) x: view x as [.., c, d]; y[.., a, b] = sum_cd w1[a, c] w2[b, d] x[.., c, d].
        x = x.to(w1.dtype).reshape(*x.shape[:-1], c, d)
        y = (w1 @ (x @ w2.T)).reshape(*x.shape[:-2], a * b) * self.scaling[name]
        drop = self._rank_drop(name, a * b, y)
        return y if drop is None else y * drop


class LoKrConv2d(LoKrLayer):
    """LoKr on nn.Conv2d (any groups/stride/padding/dilation, zero padding mode)."""

    def _dims(self) -> tuple[int, int, tuple[int, ...]]:
        base = self.base_layer
        return base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._conv2d_delta_output(name, x)
