"""LoRA layers for nn.Linear, transformers' Conv1D (transposed weight), nn.Embedding, nn.Conv2d."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quantized_base
from ..base import AdapterLayer
from ...kernels import fast_paths_enabled
from ...targeting import linear_types
from . import init, mixed_batch
from .dora import DoraVariant
from .variants import LoraVariant


@torch.no_grad()
def _set_initial(param_A: nn.Parameter, param_B: nn.Parameter, lora_A: torch.Tensor | None,
                 lora_B: torch.Tensor | None) -> None:
    """Put an init scheme's factors into freshly created (fp32) adapter parameters."""
    if lora_A is not None:
        param_A.data = lora_A.to(device=param_A.device, dtype=param_A.dtype).contiguous()
        param_B.data = lora_B.to(device=param_B.device, dtype=param_B.dtype).contiguous()


class LoraLayer(AdapterLayer):
    """Per adapter: rank, alpha, scaling and its variant (`lora_variant[name]`, plain LoRA or
    DoRA; `use_dora` is kept as the setting it came from)."""

    adapter_settings = ("r", "lora_alpha", "scaling", "use_dora", "lora_variant")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_variant: dict[str, LoraVariant] = {}

    def resolve_variant(self, use_dora: bool) -> LoraVariant:
        """The variant object for an adapter's settings; DoRA is for Linear and Conv1D only."""
        if use_dora:
            kind = type(self.base_layer).__name__
            raise ValueError(f"use_dora=True is supported for Linear and Conv1D layers, not nn.{kind}; "
                             f"exclude the {kind} layers from target_modules or set use_dora=False")
        return LoraVariant()

    def _set_hyper(self, name: str, r: int, alpha: float, use_rslora: bool, use_dora: bool) -> None:
        self.lora_variant[name] = self.resolve_variant(use_dora)
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.use_dora[name] = use_dora

    @property
    def quantized(self) -> str | None:
        """The base weight's quantized format (`quantized_base`), or None for a plain weight;
        worked out once per base layer (forward asks on every call)."""
        base = self.base_layer
        if self.__dict__.get("_format_of") is not base:
            self.__dict__["_format_of"], self.__dict__["_format"] = base, quantized_base.quantized_format(base)
        return self.__dict__["_format"]

    def _to_base_device(self, name: str) -> None:
        device = self.base_layer.weight.device
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name not in container:
                continue
            value = container[name]
            if isinstance(value, nn.Module):
                value.to(device)  # also handles a base on the `meta` device (dry runs)
            elif value.device != device:
                container[name] = nn.Parameter(value.data.to(device), requires_grad=value.requires_grad)


class Linear(LoraLayer):
    """LoRA on nn.Linear (weight [out, in]) or GPT-2's Conv1D (`fan_in_fan_out`, weight [in, out])."""

    adapter_containers = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = quantized_base.weight_shape(base_layer)
        self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's m, as peft: <adapter>.weight

    def resolve_variant(self, use_dora: bool) -> LoraVariant:
        return DoraVariant() if use_dora else LoraVariant()

    def update_layer(self, name: str, r: int, lora_alpha: float, lora_dropout: float, init_lora_weights,
                     use_rslora: bool = False, use_dora: bool = False) -> None:
        self._set_hyper(name, r, lora_alpha, use_rslora, use_dora)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # PiSSA / OLoRA decompose the base weight: a quantized one is dequantized for that.
        decomposes = init.parse_init(init_lora_weights).changes_base_weights
        base_weight = self.weight_out_in() if decomposes and self.quantized else self.base_layer.weight
        lora_A, lora_B, new_weight = init.initial_weights(
            init_lora_weights, tuple(self.lora_A[name].weight.shape), tuple(self.lora_B[name].weight.shape), r,
            self.scaling[name], base_weight=base_weight, fan_in_fan_out=self.fan_in_fan_out and not self.quantized)
        _set_initial(self.lora_A[name].weight, self.lora_B[name].weight, lora_A, lora_B)
        if new_weight is not None:  # PiSSA / OLoRA: the base keeps only the residual
            if self.quantized:
                quantized_base.store_weight(self.base_layer, new_weight)
            else:
                self.base_layer.weight.data = new_weight
        self._to_base_device(name)
        self._base_changed()
        self.lora_variant[name].init(self, name)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as [out, in]; a quantized one dequantized (fp32) to the values its forward uses."""
        if self.quantized:
            return quantized_base.dequantized_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def store_weight_out_in(self, weight: torch.Tensor) -> None:
        """Write a new base weight given as [out, in] (quantized again for a quantized base)."""
        if self.quantized:
            quantized_base.store_weight(self.base_layer, weight)
        else:
            stored = self.base_layer.weight
            stored.data.copy_((weight.T if self.fan_in_fan_out else weight).to(stored.dtype))

    def _base_changed(self) -> None:
        for variant in self.lora_variant.values():
            variant.reset()

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT saves DoRA's magnitude as `lora_magnitude_vector`, without its module's `.weight`."""
        return {("lora_magnitude_vector" if k == "lora_magnitude_vector.weight" else k): v
                for k, v in super().adapter_state(name).items()}

    def get_delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        delta = self.lora_variant[name].delta_weight(self, name, delta)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._before_merge:  # a quantized base: its weight from before the merge, exactly
                quantized_base.restore_weight(self.base_layer, self._before_merge.pop(name))
                continue
            self.lora_variant[name].unmerge(self, name)
        self._base_changed()

    @torch.no_grad()
    def merge(self, names=None, safe_merge=False) -> None:
        names = [n for n in (names or self.active_adapters) if n in self.adapter_names and n not in self.merged_adapters]
        for name in names:
            self.lora_variant[name].before_merge(self, name)
            if self.quantized:  # dequantize, add in fp32, quantize again (rounds W + dW to the grid)
                merged = self.weight_out_in() + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} produced NaN/inf weights; the adapter is broken")
                self._before_merge[name] = quantized_base.take_weight(self.base_layer)  # unmerge puts it back (exact)
                self.store_weight_out_in(merged)
                self.merged_adapters.append(name)
            else:
                super().merge([name], safe_merge)
            self._base_changed()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # a mixed-adapter batch: one adapter per row (peftkit.mixed_adapters)
            return mixed_batch.linear_forward(self, x, adapter_names, *args, **kwargs)
        if self.disabled:
            return self._base_forward(x, *args, **kwargs)
        if self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        if fast_paths_enabled("lora_linear") and self.fused_blocker() is None:
            name = self.active_adapters[0]
            fast = self.lora_variant[name].fused_forward(self, name, x)
            if fast is not None:
                return fast
        # The plain path: each variant adds its branch to the base output (in the adapters'
        # dtype, as peft), and the sum is rounded to the base output's dtype once.
        if self.quantized and not args and not kwargs:
            result = quantized_base.forward(self.base_layer, x)
        else:
            result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in self.active_adapters:
            result = self.lora_variant[name].forward(self, name, x, result)
        return result.to(dtype)

    def fused_blocker(self) -> str | None:
        """Why the fused LoRA op (`kernels.lora_linear`) does not run this layer, or None when it may.

        A quantized base keeps its own forward, which dequantizes per call and again in backward,
        and the branch is added to it. Measured per layer (benchmarks/quantized_lora_op.py): the
        op with the weight dequantized once and kept for backward is ~25% faster but holds a
        dequantized weight per layer until backward (a whole dequantized model over a step);
        the op dequantizing on use in both passes (given torchao's NF4 tensor) is no faster."""
        if self.quantized:
            return f"the base weight is quantized ({self.quantized}); its own forward dequantizes it"
        if type(self.base_layer) not in linear_types():
            return f"the base is a {type(self.base_layer).__name__}, not nn.Linear or Conv1D"
        if len(self.active_adapters) != 1:
            return f"{len(self.active_adapters)} adapters are active (the fused op takes one)"
        return None

    def _dropout_p(self, name: str) -> float:
        """The LoRA dropout probability in effect now (0 outside training)."""
        dropout = self.lora_dropout[name]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0


class Embedding(LoraLayer):
    """LoRA on nn.Embedding: A [r, num_embeddings], B [dim, r], saved without `.weight`."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(self, name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora=False, use_dora=False):
        self._set_hyper(name, r, lora_alpha, use_rslora, use_dora)
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r))
        if init_lora_weights is not False:  # PEFT: A = 0, B ~ N(0, 1) for embeddings
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])
        self._to_base_device(name)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # a mixed-adapter batch: one adapter per row (peftkit.mixed_adapters)
            return mixed_batch.embedding_forward(self, x, adapter_names, *args, **kwargs)
        if self.disabled:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        base = self.base_layer
        for name in self.active_adapters:
            after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                                  base.norm_type, base.scale_grad_by_freq, base.sparse)
            result = result + ((after_a @ self.lora_embedding_B[name].T) * self.scaling[name]).to(result.dtype)
        return result


class Conv2d(LoraLayer):
    """LoRA on nn.Conv2d: A is a conv with the base's kernel, B a 1x1 conv."""

    adapter_containers = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def update_layer(self, name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora=False, use_dora=False):
        if init.parse_init(init_lora_weights).changes_base_weights:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is supported for Linear and Conv1D layers, not "
                             f"nn.Conv2d; exclude the conv layer from target_modules or use True or 'gaussian'")
        self._set_hyper(name, r, lora_alpha, use_rslora, use_dora)
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), bias=False)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        lora_A, lora_B, _ = init.initial_weights(init_lora_weights, tuple(self.lora_A[name].weight.shape),
                                                 tuple(self.lora_B[name].weight.shape), r, self.scaling[name])
        _set_initial(self.lora_A[name].weight, self.lora_B[name].weight, lora_A, lora_B)
        self._to_base_device(name)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        if self.base_layer.kernel_size == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        return delta * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # a mixed-adapter batch: one adapter per row (peftkit.mixed_adapters)
            return mixed_batch.conv2d_forward(self, x, adapter_names, *args, **kwargs)
        if self.disabled:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            x_in = self.lora_dropout[name](x).to(self.lora_A[name].weight.dtype)
            result = result + (self.lora_B[name](self.lora_A[name](x_in)) * self.scaling[name]).to(result.dtype)
        return result
