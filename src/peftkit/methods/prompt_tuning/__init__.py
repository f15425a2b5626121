"""Prompt tuning (PEFT's PROMPT_TUNING): trainable virtual-token embeddings in front of the input.

Also home of what every prompt-learning method shares (`config.PromptLearningConfig`,
`learning.PromptLearningEncoder`), which prefix tuning builds on.
"""
from __future__ import annotations

from .. import register
from .config import PromptLearningConfig, PromptTuningConfig, PromptTuningInit
from .encoder import PromptEmbedding, create_encoder
from .learning import PromptLearningEncoder, PromptLearningMethod

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptLearningConfig", "PromptEmbedding",
           "PromptLearningEncoder", "PromptLearningMethod"]

register(PromptLearningMethod(peft_type="PROMPT_TUNING", config_cls=PromptTuningConfig, create_encoder=create_encoder))
