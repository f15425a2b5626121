"""Prompt-learning configs with PEFT's field names, defaults and JSON spelling.

`PromptLearningConfig` holds what every prompt-learning method shares (how many virtual
tokens, and the base model's shape, which is filled in from the model when left `None`);
`PromptTuningConfig` adds how the virtual-token embedding is initialised.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftConfig, TaskType

# Prompt learning needs a task-specific forward; these are the tasks peftkit implements.
SUPPORTED_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS)


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embedding starts (PEFT's names)."""

    TEXT = "TEXT"  # the word embeddings of a tokenized text, repeated/truncated
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the word embeddings of random vocabulary ids
    RANDOM = "RANDOM"  # N(0, 1), like a fresh nn.Embedding


def _positive_int_or_none(name: str, value) -> list[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return []
    return [f"{name}={value!r} must be a positive integer (or None to take it from the model)"]


@dataclass
class PromptLearningConfig(PeftConfig):
    """Virtual tokens prepended to every sequence.

    `token_dim`, `num_attention_heads` and `num_layers` describe the base model; left `None`
    they are read from the model's config when the adapter is added (and then saved).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def problems(self) -> list[str]:
        out = super().problems()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            out.append(f"num_virtual_tokens={n!r} must be a positive integer")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            out += _positive_int_or_none(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            out.append(f"num_transformer_submodules={self.num_transformer_submodules!r}: peftkit supports 1 "
                       f"(decoder-only or encoder-only models); 2 is for encoder-decoder models")
        if self.task_type not in SUPPORTED_TASKS:
            out.append(f"task_type={self.task_type!r}: {self.peft_type or 'prompt learning'} in peftkit needs one of "
                       f"{list(SUPPORTED_TASKS)}, because the virtual tokens are added by a task-specific forward")
        if self.modules_to_save is not None and not (
                isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)):
            out.append(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        return out


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: `num_virtual_tokens` trainable embeddings ([num_virtual_tokens, token_dim])
    prepended to the input embeddings.

    `prompt_tuning_init="TEXT"` starts them from the model's word embeddings of
    `prompt_tuning_init_text`, tokenized with the tokenizer at `tokenizer_name_or_path`.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        # Store the plain string so the config compares and serialises like PEFT's JSON.
        if isinstance(self.prompt_tuning_init, PromptTuningInit):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        choices = [c.value for c in PromptTuningInit]
        if self.prompt_tuning_init not in choices:
            out.append(f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {choices}")
        if self.prompt_tuning_init == PromptTuningInit.TEXT.value:
            if not self.tokenizer_name_or_path:
                out.append(f"prompt_tuning_init='TEXT' needs tokenizer_name_or_path (got {self.tokenizer_name_or_path!r})")
            if not self.prompt_tuning_init_text:
                out.append(f"prompt_tuning_init='TEXT' needs prompt_tuning_init_text (got {self.prompt_tuning_init_text!r})")
        elif self.tokenizer_kwargs:
            out.append(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is only used with prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            out.append(f"tokenizer_kwargs={self.tokenizer_kwargs!r} must be a dict of AutoTokenizer.from_pretrained arguments")
        return out
