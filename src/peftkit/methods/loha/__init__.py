"""LoHa: registration of the method (config class + how to wrap each supported module)."""
from __future__ import annotations

import torch.nn as nn

from .. import Method, register
from ..default_targets import LORA_FAMILY_TARGETS
from ..lycoris import wrap_module
from .config import LoHaConfig
from .layer import LoHaConv2d, LoHaLayer, LoHaLinear

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaLinear", "LoHaConv2d"]

DEFAULT_TARGETS = dict(LORA_FAMILY_TARGETS)


def create_layer(module: nn.Module, key: str, config: LoHaConfig, adapter_name: str):
    """Wrap `module` (at path `key`) in a LoHa layer, or return None if its type is unsupported."""
    r, alpha = config.rank_and_alpha(key)
    kwargs = dict(r=r, alpha=alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                  init_weights=config.init_weights, use_effective_conv2d=config.use_effective_conv2d)
    return wrap_module(module, key, adapter_name, kwargs, LoHaLinear, LoHaConv2d)


register(Method(
    peft_type="LOHA",
    config_cls=LoHaConfig,
    create_layer=create_layer,
    supported_types=("torch.nn.Linear", "torch.nn.Conv2d"),
    default_targets=DEFAULT_TARGETS,
))
