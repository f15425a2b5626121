"""One task vocabulary: run-config names <-> PEFT task_type, and the task a class name tells."""

from __future__ import annotations

import pytest

from peftkit.config import TaskType
from peftkit.data.tasks import TASKS, task_of_class_names, task_of_task_type, task_type_of


def test_every_task_round_trips_through_its_peft_task_type():
    for task in TASKS:
        assert task_type_of(task) in TaskType.ALL
        assert task_of_task_type(task_type_of(task)) == task
    assert task_of_task_type("TaskType.SEQ_CLS") == "seq-cls"  # str() of peft's enum on some Pythons
    assert task_of_task_type(None) is None and task_of_task_type("") is None
    assert task_of_task_type("FEATURE_EXTRACTION") is None  # a PEFT task peftkit has no commands for
    with pytest.raises(ValueError, match="task 'lm' is not accepted; accepted: causal-lm, seq-cls"):
        task_type_of("lm")


def test_class_names_tell_the_task_by_their_head():
    assert task_of_class_names(["LlamaForCausalLM"]) == "causal-lm"
    assert task_of_class_names(["GPT2LMHeadModel"]) == "causal-lm"
    assert task_of_class_names(["BertModel", "BertForTokenClassification"]) == "token-cls"
    assert task_of_class_names(["T5ForConditionalGeneration"]) == "seq2seq"
    assert task_of_class_names(["BertModel"]) is None and task_of_class_names([]) is None


def test_the_loop_and_the_recipe_speak_the_same_task_names():
    from peftkit.recipe.schema import MODEL_TASKS
    from peftkit.train.config import LOOP_TASKS

    assert MODEL_TASKS == TASKS and set(LOOP_TASKS) < set(TASKS)


def test_the_command_line_offers_the_same_task_names():
    # cli/ spells them out so that `peftkit --help` does not import peftkit.data (and datasets).
    from peftkit.cli.main import build_parser

    inspect = build_parser()._subparsers._group_actions[0].choices["inspect"]
    task = next(a for a in inspect._actions if a.dest == "task")
    assert tuple(task.choices) == TASKS
