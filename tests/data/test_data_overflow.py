"""max_length policies (truncate / drop / error) and the counts reported for them."""

from __future__ import annotations

import pytest
from datahelpers import prepare, write_jsonl

from peftkit.data import IGNORE_INDEX, DataError

SHORT = {"prompt": "one ", "completion": "two"}
LONG = {"prompt": "one two three four five six seven eight nine ten ", "completion": "one two three four five"}


def _rows(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", [SHORT, LONG, SHORT, LONG, SHORT])


def _length(tokenizer, row):
    """BOS + prompt tokens + completion tokens (encoded separately) + EOS."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return 1 + len(encode(row["prompt"])) + len(encode(row["completion"])) + 1


def test_lengths_used_by_these_tests(chat_tokenizer):
    assert _length(chat_tokenizer, SHORT) <= 8 < 24 < _length(chat_tokenizer, LONG)


def test_truncate_keeps_the_first_tokens_and_counts(tmp_path, chat_tokenizer):
    full = prepare(tmp_path, chat_tokenizer, path=_rows(tmp_path), max_length=512)
    data = prepare(tmp_path, chat_tokenizer, path=_rows(tmp_path), max_length=24)
    s = data.stats
    assert (s.rows_read, s.rows_dropped, s.rows_truncated, s.examples, s.sequences) == (5, 0, 2, 5, 5)
    assert data.train[1]["input_ids"] == full.train[1]["input_ids"][:24]
    assert data.train[1]["labels"] == full.train[1]["labels"][:24]
    assert s.total_tokens == sum(len(r["input_ids"]) for r in data.train)
    assert s.trained_tokens == sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in data.train)
    assert full.stats.rows_truncated == 0 and full.stats.total_tokens > s.total_tokens


def test_drop_removes_long_rows_and_counts(tmp_path, chat_tokenizer):
    data = prepare(tmp_path, chat_tokenizer, path=_rows(tmp_path), max_length=24, overflow="drop")
    s = data.stats
    assert (s.rows_read, s.rows_dropped, s.rows_truncated, s.examples) == (5, 2, 0, 3)
    assert len(data.train) == 3
    assert s.total_tokens == 3 * _length(chat_tokenizer, SHORT)


def test_error_names_the_row(tmp_path, chat_tokenizer):
    path = _rows(tmp_path)
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_tokenizer, path=path, max_length=24, overflow="error")
    n = _length(chat_tokenizer, LONG)
    assert str(info.value).startswith(f"{path}, line 2: has {n} tokens, more than data.max_length=24")


def test_all_rows_dropped_is_an_error(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [LONG])
    with pytest.raises(DataError, match="no train rows are left: all 1 were longer than data.max_length=8"):
        prepare(tmp_path, chat_tokenizer, path=path, max_length=8, overflow="drop")


def test_classification_truncation_keeps_special_tokens(tmp_path, bert_tokenizer):
    text = "one two three four five six seven eight nine ten"
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": text, "label": "a"}, {"text": "one", "label": "b"}])
    data = prepare(tmp_path, bert_tokenizer, "seq-cls", path=path, max_length=6)
    assert data.stats.rows_truncated == 1
    ids = data.train[0]["input_ids"]
    assert ids == bert_tokenizer(text, truncation=True, max_length=6)["input_ids"]
    assert ids[0] == bert_tokenizer.cls_token_id and ids[-1] == bert_tokenizer.sep_token_id and len(ids) == 6
