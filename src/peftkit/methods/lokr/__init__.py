"""LoKr: registration of the method (config class + how to wrap each supported module)."""
from __future__ import annotations

import torch.nn as nn

from .. import Method, register
from ..loha import DEFAULT_TARGETS, check_conv_padding
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
    if isinstance(module, LoKrLayer):
        module.update_layer(adapter_name, **kwargs)
        return module
    if isinstance(module, nn.Linear):
        layer = LoKrLinear(module)
    elif isinstance(module, nn.Conv2d):
        check_conv_padding(module, key)
        layer = LoKrConv2d(module)
    else:
        return None
    layer.update_layer(adapter_name, **kwargs)
    return layer


register(Method(
    peft_type="LOKR",
    config_cls=LoKrConfig,
    create_layer=create_layer,
    supported_types=("torch.nn.Linear", "torch.nn.Conv2d"),
    default_targets=DEFAULT_TARGETS,
))
