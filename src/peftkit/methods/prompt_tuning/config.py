"""`PromptTuningConfig` (PEFT's field names, defaults and JSON spelling): the shared
prompt-learning fields plus how the virtual-token embedding is initialised."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from ..prompt_learning_config import PromptLearningConfig

class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embedding starts (PEFT's names)."""

    TEXT = "TEXT"  # the word embeddings of a tokenized text, repeated/truncated
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the word embeddings of random vocabulary ids
    RANDOM = "RANDOM"  # N(0, 1), like a fresh nn.Embedding


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
