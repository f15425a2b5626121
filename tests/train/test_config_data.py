"""TrainConfig validation, the schedule, the data plan and the default collate."""

import math

import pytest
import torch

from peftkit.train import DataPlan, TrainConfig, TrainConfigError, lr_factor, make_collate


def test_validate_lists_every_problem_with_value_and_accepted():
    config = TrainConfig(
        lr=-1.0, epochs=0, scheduler="step", precision="fp8", warmup_steps=5, warmup_ratio=0.1,
        micro_batch_size="4", keep_last=0, progress=1, max_grad_norm=float("nan"),
    )
    with pytest.raises(TrainConfigError) as err:
        config.validate()
    problems = err.value.problems
    expected = [
        "lr=-1.0: expected a finite number > 0",
        "epochs=0: expected an integer >= 1",
        "scheduler='step': expected one of 'cosine', 'linear', 'constant'",
        "precision='fp8': expected one of 'auto', 'fp32', 'bf16', 'fp16'",
        "warmup_steps=5 and warmup_ratio=0.1: expected at most one of them to be set",
        "micro_batch_size='4': expected an integer",
        "keep_last=0: expected an integer >= 1 or null (keep all)",
        "progress=1: expected true/false",
        "max_grad_norm=nan: expected a finite number >= 0 or null",
    ]
    assert sorted(problems) == sorted(expected)
    assert "9 problems" in str(err.value)


def test_from_dict_reports_unknown_keys_and_converts_yaml_strings():
    config = TrainConfig.from_dict({"lr": "2e-4", "max_steps": "10", "weight_decay": 0})
    assert config.lr == 2e-4 and config.max_steps == 10 and isinstance(config.weight_decay, float)
    with pytest.raises(TrainConfigError) as err:
        TrainConfig.from_dict({"learning_rate": 1e-3, "epochs": -2})
    assert len(err.value.problems) == 2
    assert "unknown key 'learning_rate': accepted keys are" in str(err.value)
    assert " lr," in str(err.value)
    assert "epochs=-2" in str(err.value)


def test_lr_schedule_warmup_then_decay():
    total, warmup = 10, 2
    assert [lr_factor(s, total, warmup, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    linear = [lr_factor(s, total, warmup, "linear") for s in range(total)]
    assert linear[2] == 1.0 and math.isclose(linear[-1], 1 / 8) and all(a > b for a, b in zip(linear[2:], linear[3:]))
    cosine = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert math.isclose(cosine[6], 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_plan_two_processes_read_what_one_process_with_double_micro_batch_reads():
    one = DataPlan(13, micro_batch_size=4, grad_accum=2, num_processes=1, seed=3, shuffle=True)
    two = DataPlan(13, micro_batch_size=2, grad_accum=2, num_processes=2, seed=3, shuffle=True)
    assert one.steps_per_epoch == two.steps_per_epoch == 2  # 8 rows, then a partial window of 5
    order = one.epoch_order(1)
    assert sorted(order) == list(range(13)) and order != one.epoch_order(0) and order == two.epoch_order(1)
    for step in range(2):
        single = one.micro_batches(order, step, 0)
        r0, r1 = two.micro_batches(order, step, 0), two.micro_batches(order, step, 1)
        assert len(r0) == len(r1) == len(single)
        assert [a + b for a, b in zip(r0, r1)] == single
    # Last window holds 5 rows: micro-steps [4 rows], [1 row]; process 1 has nothing in the second.
    assert two.micro_batches(order, 1, 1)[1] == []


def test_collate_pads_right_and_masks_labels():
    collate = make_collate(pad_token_id=7, task="causal-lm")
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    cls = make_collate(0, "seq-cls")([{"input_ids": [1, 2], "label": 2}, {"input_ids": [3], "labels": 0}])
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="row 1: labels has 1 entries but input_ids has 2"):
        collate([{"input_ids": [1]}, {"input_ids": [1, 2], "labels": [5]}])
    with pytest.raises(ValueError, match="row 0 has no 'input_ids'"):
        collate([{"text": "hi"}])


def test_data_fingerprint_is_content_based_and_the_same_for_a_list_and_a_dataset():
    from datasets import Dataset

    from peftkit.train.data import data_fingerprint

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "text": "a"}, {"input_ids": [4, 5], "labels": [4, 5]}]
    same = [dict(r) for r in rows]
    changed = [dict(rows[0]), {"input_ids": [4, 6], "labels": [4, 6]}]
    assert data_fingerprint(rows) == data_fingerprint(same) == data_fingerprint(Dataset.from_list(rows))
    assert data_fingerprint(rows) != data_fingerprint(changed)
    assert data_fingerprint(rows) != data_fingerprint(rows[:1])
    cls = [{"input_ids": [1, 2], "label": 0}, {"input_ids": [3], "label": 2}]
    assert data_fingerprint(cls) == data_fingerprint(Dataset.from_list(cls))
