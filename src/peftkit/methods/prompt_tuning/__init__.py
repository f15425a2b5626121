"""Prompt tuning (PEFT's PROMPT_TUNING): trainable virtual-token embeddings in front of the input.

What every prompt-learning method shares lives in `methods.prompt_learning` and
`methods.prompt_learning_config`, which prefix tuning builds on too.
"""
from __future__ import annotations

from .. import register
from ..prompt_learning import PromptLearningEncoder, PromptLearningMethod
from ..prompt_learning_config import PromptLearningConfig
from .config import PromptTuningConfig, PromptTuningInit
from .encoder import PromptEmbedding, create_encoder

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptLearningConfig", "PromptEmbedding",
           "PromptLearningEncoder", "PromptLearningMethod"]

register(PromptLearningMethod(peft_type="PROMPT_TUNING", config_cls=PromptTuningConfig, create_encoder=create_encoder))
