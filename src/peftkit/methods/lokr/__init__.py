"""LoKr: registration of the method (config class + how to wrap each supported module)."""
from __future__ import annotations

import torch.nn as nn

from .. import Method, register
from ..default_targets import LORA_FAMILY_TARGETS
from ..lycoris import wrap_module
from .config import LoKrConfig
from .layer import LoKrConv2d, LoKrLayer, LoKrLinear, factorization

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrLinear", "LoKrConv2d", "factorization"]


def create_layer(module: nn.Module, key: str, config: LoKrConfig, adapter_name: str):
    """Wrap `module` (at path `key`) in a LoKr layer, or return None if its type is unsupported."""
    r, alpha = config.rank_and_alpha(key)
    kwargs = dict(r=r, alpha=alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                  init_weights=config.init_weights, use_effective_conv2d=config.use_effective_conv2d,
                  decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                  rank_dropout_scale=config.rank_dropout_scale)
    return wrap_module(module, key, adapter_name, kwargs, LoKrLinear, LoKrConv2d)


register(Method(
    peft_type="LOKR",
    config_cls=LoKrConfig,
    create_layer=create_layer,
    supported_types=("torch.nn.Linear", "torch.nn.Conv2d"),
    default_targets=dict(LORA_FAMILY_TARGETS),
))
