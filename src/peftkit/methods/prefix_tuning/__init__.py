"""Prefix tuning (PEFT's PREFIX_TUNING): trainable key/value prefixes in every attention layer."""
from __future__ import annotations

from .. import register
from ..prompt_learning import PromptLearningMethod
from .config import PrefixTuningConfig
from .encoder import PrefixEncoder, create_encoder

__all__ = ["PrefixTuningConfig", "PrefixEncoder"]

register(PromptLearningMethod(peft_type="PREFIX_TUNING", config_cls=PrefixTuningConfig, create_encoder=create_encoder))
