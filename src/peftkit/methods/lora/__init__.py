"""LoRA: registration of the method (config class + how to wrap each supported module)."""
from __future__ import annotations

import re
import warnings

import torch.nn as nn

from ...targeting import is_conv1d
from .. import Method, register
from ..default_targets import LORA_FAMILY_TARGETS as DEFAULT_TARGETS
from .config import LoraConfig
from .layer import Conv2d, Embedding, Linear, LoraLayer

__all__ = ["LoraConfig", "LoraLayer", "Linear", "Embedding", "Conv2d"]

def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rule: the first pattern that matches the end of the module path wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def create_layer(module: nn.Module, key: str, config: LoraConfig, adapter_name: str):
    """Wrap `module` (at path `key`) in a LoRA layer, or return None if its type is unsupported."""
    r = _pattern_value(config.rank_pattern, key, config.r)
    alpha = _pattern_value(config.alpha_pattern, key, config.lora_alpha)
    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                  use_rslora=config.use_rslora, use_dora=config.use_dora)
    if isinstance(module, LoraLayer):
        module.update_layer(adapter_name, **kwargs)
        return module
    if isinstance(module, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True but {key} is nn.Linear; using fan_in_fan_out=False for it")
        layer = Linear(module, fan_in_fan_out=False)
    elif is_conv1d(module):
        layer = Linear(module, fan_in_fan_out=True)  # GPT-2 Conv1D stores the weight as [in, out]
    elif isinstance(module, nn.Embedding):
        layer = Embedding(module)
    elif isinstance(module, nn.Conv2d):
        layer = Conv2d(module)
    else:
        return None
    layer.update_layer(adapter_name, **kwargs)
    return layer


register(Method(
    peft_type="LORA",
    config_cls=LoraConfig,
    create_layer=create_layer,
    supported_types=("torch.nn.Linear", "transformers Conv1D", "torch.nn.Embedding", "torch.nn.Conv2d"),
    default_targets=DEFAULT_TARGETS,
))
