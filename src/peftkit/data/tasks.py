"""A model's task in one vocabulary: the run config's names (`causal-lm`, ...) are what users
write; PEFT's `task_type` (`CAUSAL_LM`, ...) is what adapter_config.json holds. Only this
module translates between the two, or reads a task off a transformers class name.

It lives in data/ because that is the lowest layer that speaks the task names.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..config import TaskType

TASKS = ("causal-lm", "seq-cls", "seq2seq", "token-cls")
_TASK_TYPES = {"causal-lm": TaskType.CAUSAL_LM, "seq-cls": TaskType.SEQ_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM,
               "token-cls": TaskType.TOKEN_CLS}
_TASK_OF_TYPE = {task_type: task for task, task_type in _TASK_TYPES.items()}
# How transformers names a model class by its head (GPT-2-era classes end in "LMHeadModel").
_CLASS_ENDINGS = (
    (("ForCausalLM", "LMHeadModel"), "causal-lm"),
    (("ForSequenceClassification",), "seq-cls"),
    (("ForTokenClassification",), "token-cls"),
    (("ForConditionalGeneration",), "seq2seq"),
)


def task_type_of(task: str) -> str:
    """PEFT's task_type for a task name: "causal-lm" -> "CAUSAL_LM"."""
    if task not in _TASK_TYPES:
        raise ValueError(f"task {task!r} is not accepted; accepted: {', '.join(TASKS)}")
    return _TASK_TYPES[task]


def task_of_task_type(task_type: Any) -> str | None:
    """The task name of a PEFT task_type ("CAUSAL_LM", or peft's TaskType enum); None when it is
    unset or names a task peftkit does not have (callers say which of the two it was)."""
    if task_type in (None, ""):
        return None
    name = str(getattr(task_type, "value", task_type)).upper().split(".")[-1]
    return _TASK_OF_TYPE.get(name)


def accepted_task_types() -> list[str]:
    return list(_TASK_OF_TYPE)


def task_of_class_names(names: Iterable[str]) -> str | None:
    """The task the first telling class name says: "LlamaForCausalLM" -> "causal-lm"; else None."""
    for name in names:
        for endings, task in _CLASS_ENDINGS:
            if name.endswith(endings):
                return task
    return None
