"""(IA)^3 on nn.Linear and transformers' Conv1D: y = l_out * W (l_in * x) + ...

A feedforward module scales its input (`ia3_l` of shape [1, in]); any other scales its
output and bias (`ia3_l` of shape [out, 1]). Shapes and the name `ia3_l` are PEFT's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import quantized_base
from ..base import AdapterLayer


class IA3Linear(AdapterLayer):
    """(IA)^3 on nn.Linear (weight [out, in]) or GPT-2's Conv1D (`fan_in_fan_out`, weight [in, out])."""

    adapter_containers = ("ia3_l",)
    adapter_settings = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = quantized_base.weight_shape(base_layer)
        self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        # Weights saved at merge time for adapters whose vector has zeros (division cannot undo those).
        self._merge_backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def update_layer(self, name: str, is_feedforward: bool, init_ia3_weights: bool = True) -> None:
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        # PEFT draws random values and overwrites them with ones unless init is off; same here.
        vector = torch.randn(shape, device=device)
        if init_ia3_weights:
            vector.fill_(1.0)
        self.ia3_l[name] = nn.Parameter(vector)
        self.is_feedforward[name] = is_feedforward

    # --- forward -----------------------------------------------------------------------------
    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Products of the active adapters' input and output vectors (flat), or None."""
        scale_in = scale_out = None
        for name in self.active_adapters:
            vector = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self._base_forward(x, *args, **kwargs)
        if self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        scale_in, scale_out = self._scales()
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)
        return result

    # --- merging -------------------------------------------------------------------------------
    def _weight_factor(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast against `base_layer.weight` in its stored layout."""
        vector = self.ia3_l[name].detach().flatten()
        scales_columns_of_out_in = self.is_feedforward[name]  # input scaling = columns of [out, in]
        if self.fan_in_fan_out:
            scales_columns_of_out_in = not scales_columns_of_out_in
        return vector.view(1, -1) if scales_columns_of_out_in else vector.view(-1, 1)

    def _weight(self) -> torch.Tensor:
        """The base weight in its stored layout; a quantized one dequantized (fp32)."""
        return quantized_base.dequantized_weight(self.base_layer) if quantized_base.is_quantized(self.base_layer) \
            else self.base_layer.weight

    def _store_weight(self, weight: torch.Tensor) -> None:
        quantized_base.store_weight(self.base_layer, weight)  # copies in place for a plain weight

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [n for n in (names or self.active_adapters) if n in self.adapter_names and n not in self.merged_adapters]
        bias = getattr(self.base_layer, "bias", None)
        for name in names:
            weight = self._weight()
            factor = self._weight_factor(name)
            scales_bias = not self.is_feedforward[name] and bias is not None
            new_weight = (weight.float() * factor.float()).to(weight.dtype)
            new_bias = (bias.float() * factor.flatten().float()).to(bias.dtype) if scales_bias else None
            if safe_merge and not (torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
                raise ValueError(f"Merging adapter {name!r} produced NaN/inf weights; the adapter is broken")
            if quantized_base.is_quantized(self.base_layer):  # unmerge puts both back (exact)
                self._before_merge[name] = quantized_base.take_weight(self.base_layer)
                self._merge_backup[name] = (None, bias.detach().clone() if scales_bias else None)
            elif (factor == 0).any():
                self._merge_backup[name] = (weight.detach().clone(), bias.detach().clone() if scales_bias else None)
            self._store_weight(new_weight)
            if new_bias is not None:
                bias.data.copy_(new_bias)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        bias = getattr(self.base_layer, "bias", None)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            scales_bias = not self.is_feedforward[name] and bias is not None
            if name in self._merge_backup:
                old_weight, old_bias = self._merge_backup.pop(name)
                if name in self._before_merge:  # a quantized base
                    quantized_base.restore_weight(self.base_layer, self._before_merge.pop(name))
                else:
                    self._store_weight(old_weight)
                if old_bias is not None:
                    bias.data.copy_(old_bias)
                continue
            factor = self._weight_factor(name).float()
            weight = self._weight()
            self._store_weight((weight.float() / factor).to(weight.dtype))
            if scales_bias:
                bias.data.copy_((bias.float() / factor.flatten()).to(bias.dtype))

    def get_delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError(
            "(IA)^3 rescales the weight (and bias) multiplicatively, so it has no additive delta; "
            "use merge() / merge_and_unload() to fold it in")
