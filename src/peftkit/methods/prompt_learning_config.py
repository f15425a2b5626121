"""`PromptLearningConfig`: what every prompt-learning method's config shares (how many virtual
tokens, and the base model's shape, filled in from the model when left `None`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import PeftConfig, TaskType

# Prompt learning needs a task-specific forward; these are the tasks peftkit implements.
SUPPORTED_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS)


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
