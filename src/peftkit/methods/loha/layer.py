"""LoHa (low-rank Hadamard product) on nn.Linear and nn.Conv2d.

delta_W = scaling * (w1_a @ w1_b) * (w2_a @ w2_b)   (elementwise product of two rank-r matrices)

Linear: hada_w1_a / hada_w2_a [out, r], hada_w1_b / hada_w2_b [r, in].
Conv2d: the same on the flattened kernel [out, in/groups * kh * kw]; with `use_effective_conv2d`
(kernel > 1x1) each factor is a CP decomposition: hada_t1 / hada_t2 [r, r, kh, kw],
hada_w*_a [r, out], hada_w*_b [r, in/groups]. Names and shapes are PEFT's.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quantized_base
from ..lycoris import LycorisLayer, cp_rebuild


def _kaiming(param: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))


class LoHaLayer(LycorisLayer):
    adapter_containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_containers:
            setattr(self, attr, nn.ParameterDict())

    def _weight_shape(self, use_effective_conv2d: bool) -> tuple[int, ...]:
        """The shape the factors describe: (out, in) for a matrix, (out, in, kh, kw) for CP."""
        raise NotImplementedError(f"{type(self).__name__} must define _weight_shape")

    def update_layer(self, name: str, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                     init_weights: bool = True, use_effective_conv2d: bool = False) -> None:
        self._set_hyper(name, r, alpha, rank_dropout, module_dropout)
        shape = self._weight_shape(use_effective_conv2d)
        if len(shape) == 4:
            out_dim, in_dim, kh, kw = shape
            for i in ("1", "2"):
                self._new_parameter(name, f"hada_t{i}", r, r, kh, kw)
                self._new_parameter(name, f"hada_w{i}_a", r, out_dim)
                self._new_parameter(name, f"hada_w{i}_b", r, in_dim)
        else:
            out_dim, in_dim = shape
            for i in ("1", "2"):
                self._new_parameter(name, f"hada_w{i}_a", out_dim, r)
                self._new_parameter(name, f"hada_w{i}_b", r, in_dim)
        # He init (FedPara); with init_weights, hada_w2_b = 0 makes the initial delta zero. PEFT's
        # order, so that equal seeds give equal weights.
        for attr in self.adapter_containers:
            if name in getattr(self, attr):
                if init_weights and attr == "hada_w2_b":
                    nn.init.zeros_(self.hada_w2_b[name])
                else:
                    _kaiming(getattr(self, attr)[name])

    def _factor_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The two rank-r matrices (or CP rebuilds) whose elementwise product is the delta."""
        if name in self.hada_t1:
            return (cp_rebuild(self.hada_t1[name], self.hada_w1_a[name], self.hada_w1_b[name]),
                    cp_rebuild(self.hada_t2[name], self.hada_w2_a[name], self.hada_w2_b[name]))
        return self.hada_w1_a[name] @ self.hada_w1_b[name], self.hada_w2_a[name] @ self.hada_w2_b[name]

    def get_delta_weight(self, name: str) -> torch.Tensor:
        w1, w2 = self._factor_weights(name)
        return ((w1 * w2) * self.scaling[name]).reshape(quantized_base.weight_shape(self.base_layer))


class LoHaLinear(LoHaLayer):
    """LoHa on nn.Linear."""

    def _weight_shape(self, use_effective_conv2d: bool) -> tuple[int, ...]:
        return quantized_base.weight_shape(self.base_layer)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a1, b1, a2, b2 = (getattr(self, f"hada_{k}")[name] for k in ("w1_a", "w1_b", "w2_a", "w2_b"))
        x = x.to(a1.dtype)
        out_dim, in_dim = a1.shape[0], b1.shape[1]
        r1, r2 = a1.shape[1], a2.shape[1]
        if r1 * r2 * (in_dim + out_dim) < in_dim * out_dim:
            # (A1 B1) * (A2 B2) = U V with U[o, pq] = A1[o, p] A2[o, q] and V[pq, i] = B1[p, i] B2[q, i]:
            # a rank r^2 product that is cheaper than building the [out, in] matrix.
            u = (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(out_dim, r1 * r2)
            v = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(r1 * r2, in_dim)
            delta = F.linear(F.linear(x, v), u) * self.scaling[name]
        else:
            delta = F.linear(x, self.get_delta_weight(name))
        drop = self._rank_drop(name, out_dim, delta)
        return delta if drop is None else delta * drop


class LoHaConv2d(LoHaLayer):
    """LoHa on nn.Conv2d (any groups/stride/padding/dilation, zero padding mode)."""

    def _weight_shape(self, use_effective_conv2d: bool) -> tuple[int, ...]:
        base = self.base_layer
        in_dim = base.in_channels // base.groups
        kh, kw = base.kernel_size
        # A 1x1 kernel is a plain matrix; PEFT switches the CP form off for it.
        if use_effective_conv2d and (kh, kw) != (1, 1):
            return (base.out_channels, in_dim, kh, kw)
        return (base.out_channels, in_dim * kh * kw)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._conv2d_delta_output(name, x)
