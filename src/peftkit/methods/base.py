"""What every layer-wrapping adapter shares: the wrapped `base_layer`, per-adapter state,
activation, merging, and translation of its state to PEFT's local key names."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..checkpoint import SavedAdapterLayer, copy_checked
from . import quantized_base


def row_groups(adapter_names: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """A mixed-adapter batch's rows by adapter: (name, indices of its rows) per distinct name, in
    order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]


class AdapterLayer(SavedAdapterLayer):
    """Wraps a frozen module and adds parameters for one or more named adapters.

    Subclasses list the containers (ModuleDict / ParameterDict attributes) that hold per-adapter
    tensors in `adapter_containers`, and per-adapter plain settings (dicts keyed by adapter name)
    in `adapter_settings`, so that add/delete/save/load work the same for every method.
    """

    adapter_containers: tuple[str, ...] = ()
    adapter_settings: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []
        # A quantized base's weight object from before each merge: unmerge puts it back exactly.
        self._before_merge: dict[str, tuple] = {}

    # Code in transformers reads e.g. `self.wo.weight.dtype` on the modules we wrap.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- bookkeeping ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_containers[0]).keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, names: str | list[str], trainable: bool = True) -> None:
        """Activate `names`; only active adapters' parameters require grad (when trainable)."""
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.adapter_names]
        for name in self.adapter_names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(trainable and name in self.active_adapters)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                value = container[name]
                params.extend(value.parameters() if isinstance(value, nn.Module) else [value])
        return params

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for attr in self.adapter_settings:
            getattr(self, attr).pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # --- state in PEFT's local key names ------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """This layer's tensors for one adapter, keyed as PEFT saves them (adapter name removed)."""
        state = {}
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name not in container:
                continue
            value = container[name]
            if isinstance(value, nn.Module):
                for key, tensor in value.state_dict().items():
                    state[f"{attr}.{key}"] = tensor
            else:
                state[attr] = value.data
        return state

    @torch.no_grad()
    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> list[str]:
        """Copy tensors in place; return keys of this layer's state absent from `state`.

        A shape mismatch raises with the module path (`where`) and both shapes.
        """
        missing = []
        own = self.adapter_state(name)
        for key, target in own.items():
            if key not in state:
                missing.append(key)
                continue
            copy_checked(target, state[key], f"{where}.{key}")
        return missing

    # --- merging ---------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The change this adapter makes to `base_layer.weight` (same shape and layout)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [n for n in (names or self.active_adapters) if n in self.adapter_names and n not in self.merged_adapters]
        if quantized_base.is_quantized(self.base_layer):  # dequantize, add in fp32, quantize again
            for name in names:
                merged = quantized_base.dequantized_weight(self.base_layer) + self.get_delta_weight(name).float()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} produced NaN/inf weights; the adapter is broken")
                self._before_merge[name] = quantized_base.take_weight(self.base_layer)
                quantized_base.store_weight(self.base_layer, merged)
                self.merged_adapters.append(name)
            return
        weight = self.base_layer.weight
        for name in names:
            delta = self.get_delta_weight(name).to(weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} produced NaN/inf weights; the adapter is broken")
                weight.data.copy_(merged)
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._before_merge:
                quantized_base.restore_weight(self.base_layer, self._before_merge.pop(name))
                continue
            weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def _base_forward(self, x, *args, **kwargs):
        """Run only the frozen module, unmerging first when adapters were disabled after a merge."""
        if self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(AdapterLayer):
    """A trainable copy of a whole module per adapter (classifier heads, lm_head, ...).

    PEFT saves the copy under the module's plain key, e.g. `base_model.model.classifier.weight`.
    """

    adapter_containers = ("modules_to_save",)
    saves_whole_module = True

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__(base_layer)
        # peft names the wrapped module `original_module` here (parameter and state_dict keys)
        self.original_module = self._modules.pop("base_layer")
        self.modules_to_save = nn.ModuleDict()
        self.add_copy(adapter_name)

    def add_copy(self, adapter_name: str) -> None:
        import copy

        clone = copy.deepcopy(self.base_layer)
        for param in clone.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    @torch.no_grad()
    def load_adapter_state(self, name, state, where):
        module = self.modules_to_save[name]
        own = module.state_dict()
        missing = [k for k in own if k not in state]
        for key, target in own.items():
            if key in state:
                copy_checked(target, state[key], f"{where}.{key}")
        return missing

    @property
    def base_layer(self) -> nn.Module:
        return self.original_module

    def merge(self, names=None, safe_merge=False) -> None:
        pass  # a replaced module has nothing to fold in; merge_and_unload swaps the copy in

    def unmerge(self) -> None:
        pass

    @property
    def weight(self) -> torch.Tensor:
        return self.active_module().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.active_module(), "bias", None)

    def active_module(self) -> nn.Module:
        if self.disabled or not self.active_adapters:
            return self.base_layer
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # a mixed-adapter batch (peftkit.mixed_adapters): rows through their copies
            return self._rows_forward(adapter_names, *args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def _rows_forward(self, adapter_names: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of `x` through its adapter's copy ("__base__" or an adapter without a copy
        here: the original module), as peft's ModulesToSaveWrapper does."""
        if len(x) != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch reaching "
                             f"{type(self.base_layer).__name__} has {len(x)} rows; give one name per row")
        result = None
        for name, index in row_groups(adapter_names, x.device):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.base_layer
            out = module(x[index], *args, **kwargs)
            if result is None:
                result = out.new_empty((len(x),) + tuple(out.shape[1:]))
            result[index] = out
        return result

    def __getattr__(self, name: str):
        # Code that reads e.g. `model.lm_head.weight` or `score.out_features` still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module(), name)
