"""LoHa: registration of the method (config class + how to wrap each supported module)."""
from __future__ import annotations

import torch.nn as nn

from .. import Method, register
from ..lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS
from .config import LoHaConfig
from .layer import LoHaConv2d, LoHaLayer, LoHaLinear

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaLinear", "LoHaConv2d"]

# PEFT's LoHa defaults are a copy of its LoRA table.
DEFAULT_TARGETS = dict(LORA_DEFAULT_TARGETS)


def check_conv_padding(module: nn.Module, key: str) -> None:
    """The delta runs as F.conv2d with zero padding; other padding modes would silently differ."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"{key} is an nn.Conv2d with padding_mode={module.padding_mode!r}; LoHa/LoKr support "
                         f"only padding_mode='zeros'. Exclude it via exclude_modules.")


def create_layer(module: nn.Module, key: str, config: LoHaConfig, adapter_name: str):
    """Wrap `module` (at path `key`) in a LoHa layer, or return None if its type is unsupported."""
    r, alpha = config.rank_and_alpha(key)
    kwargs = dict(r=r, alpha=alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                  init_weights=config.init_weights, use_effective_conv2d=config.use_effective_conv2d)
    if isinstance(module, LoHaLayer):
        module.update_layer(adapter_name, **kwargs)
        return module
    if isinstance(module, nn.Linear):
        layer = LoHaLinear(module)
    elif isinstance(module, nn.Conv2d):
        check_conv_padding(module, key)
        layer = LoHaConv2d(module)
    else:
        return None
    layer.update_layer(adapter_name, **kwargs)
    return layer


register(Method(
    peft_type="LOHA",
    config_cls=LoHaConfig,
    create_layer=create_layer,
    supported_types=("torch.nn.Linear", "torch.nn.Conv2d"),
    default_targets=DEFAULT_TARGETS,
))
