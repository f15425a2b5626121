"""DataConfig validation: every bad value is reported at once, naming what is accepted."""

from __future__ import annotations

import pytest

from peftkit.data import DataConfig, DataError, prepare_datasets


def test_valid_config_passes_and_round_trips():
    config = DataConfig(path=["a.jsonl", "b.jsonl"], eval_split=0.1, column_mapping={"q": "prompt", "a": "completion"})
    config.validate()
    assert DataConfig.from_dict(config.to_dict()) == config
    assert config.paths() == ["a.jsonl", "b.jsonl"] and config.eval_paths() == []


def test_all_problems_reported_together():
    config = DataConfig(
        path=None, eval_split=1.5, format="chatml", max_length=1, overflow="cut", train_on="prompt",
        packing="yes", seed=-1, column_mapping={"q": "question", "a": "prompt", "b": "prompt"},
    )  # fmt: skip
    with pytest.raises(DataError) as info:
        config.validate()
    message = str(info.value)
    for expected in (
        "data.path: required",
        "data.eval_split: 1.5 is outside [0, 1)",
        "data.format: 'chatml' is not a known format; accepted: auto, text, prompt_completion, alpaca, messages",
        "data.max_length: 1 is not an integer >= 2",
        "data.overflow: 'cut' is not a policy; accepted: truncate, drop, error",
        "data.train_on: 'prompt' is not accepted; accepted: completion, all",
        "data.packing: 'yes' is not a boolean",
        "data.seed: -1 is not a non-negative integer",
        "data.column_mapping['q']: 'question' is not a canonical column; accepted: text, prompt, completion",
        "columns ['a', 'b'] all map to 'prompt'",
    ):
        assert expected in message, expected


def test_from_dict_names_unknown_keys_and_bad_values():
    with pytest.raises(DataError) as info:
        DataConfig.from_dict({"path": "x.jsonl", "max_len": 128, "eval_path": "e.jsonl", "eval_split": 0.2})
    message = str(info.value)
    assert "data.max_len: unknown setting; accepted settings are path, eval_path" in message
    assert "set together with data.eval_path" in message


def test_task_specific_settings_rejected(tmp_path, bert_tokenizer):
    config = DataConfig(path=str(tmp_path / "x.jsonl"), packing=True, train_on="all", cache_dir=str(tmp_path))
    with pytest.raises(DataError) as info:
        prepare_datasets(config, bert_tokenizer, "seq-cls")
    assert "packing is only for task 'causal-lm'" in str(info.value)
    assert "data.train_on: 'all' only applies to task 'causal-lm'" in str(info.value)
    with pytest.raises(DataError, match="task 'lm' is not accepted; accepted: causal-lm, seq-cls, seq2seq"):
        prepare_datasets(DataConfig(path="x.jsonl"), bert_tokenizer, "lm")
