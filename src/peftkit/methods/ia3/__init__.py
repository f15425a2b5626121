"""(IA)^3: registration of the method (config class, defaults per architecture, layer factory)."""
from __future__ import annotations

import re
import warnings

import torch.nn as nn

from ...targeting import is_conv1d
from .. import Method, register
from .config import IA3Config
from .layer import IA3Linear

__all__ = ["IA3Config", "IA3Linear"]

# model_type -> default target modules and the feedforward subset (PEFT's tables).
DEFAULT_TARGETS = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


def prepare_config(model: nn.Module, config: IA3Config) -> None:
    """Fill `feedforward_modules` from the architecture's default when it is None (PEFT does the
    same, and saves the filled-in value)."""
    if config.feedforward_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_FEEDFORWARD:
        config.feedforward_modules = list(DEFAULT_FEEDFORWARD[model_type])
    elif config.target_modules is not None:  # (with both unset, target resolution reports the problem)
        raise ValueError(
            f"feedforward_modules is not set and there is no default for model_type={model_type!r} "
            f"(defaults exist for {sorted(DEFAULT_FEEDFORWARD)}). Set feedforward_modules to the targets whose "
            f"input should be scaled, or to [] for none.")


def is_feedforward(config: IA3Config, key: str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry must end it (plain suffix)."""
    feedforward = config.feedforward_modules
    if feedforward is None:
        raise ValueError(f"IA3Config.feedforward_modules is None while adapting {key!r}; set it to a list of "
                         f"module names, a regex string, or [] for none")
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, key) is not None
    return any(key.endswith(name) for name in feedforward)


def create_layer(module: nn.Module, key: str, config: IA3Config, adapter_name: str):
    """Wrap `module` (at path `key`) in an (IA)^3 layer, or return None if its type is unsupported."""
    feedforward = is_feedforward(config, key)
    if isinstance(module, IA3Linear):
        module.update_layer(adapter_name, feedforward, config.init_ia3_weights)
        return module
    if isinstance(module, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True but {key} is nn.Linear; using fan_in_fan_out=False for it")
        layer = IA3Linear(module, fan_in_fan_out=False)
    elif is_conv1d(module):
        layer = IA3Linear(module, fan_in_fan_out=True)  # GPT-2 Conv1D stores the weight as [in, out]
    else:
        return None
    layer.update_layer(adapter_name, feedforward, config.init_ia3_weights)
    return layer


register(Method(
    peft_type="IA3",
    config_cls=IA3Config,
    create_layer=create_layer,
    supported_types=("torch.nn.Linear", "transformers Conv1D"),
    default_targets=DEFAULT_TARGETS,
    prepare_config=prepare_config,
))
