"""The tokenized-data cache: hit on an identical second call, miss when data, tokenizer or settings change."""

from __future__ import annotations

import os

from datahelpers import build_chat_tokenizer, prepare, write_jsonl

ROWS = [{"prompt": f"row {i} says ", "completion": f"hello {i}"} for i in range(8)]


def test_second_call_hits_and_settings_change_misses(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = prepare(tmp_path, chat_tokenizer, path=path, max_length=64)
    second = prepare(tmp_path, chat_tokenizer, path=path, max_length=64)
    assert not first.cache_hit and second.cache_hit
    assert second.cache_path == first.cache_path and second.cache_path.startswith(str(tmp_path / "cache"))
    assert second.stats == first.stats and second.format == first.format
    assert second.train.to_list() == first.train.to_list()
    assert sorted(os.listdir(first.cache_path)) == ["meta.json", "train.arrow"]

    shorter = prepare(tmp_path, chat_tokenizer, path=path, max_length=12)
    assert not shorter.cache_hit and shorter.cache_path != first.cache_path
    assert prepare(tmp_path, chat_tokenizer, path=path, max_length=64, train_on="all").cache_hit is False
    assert prepare(tmp_path, chat_tokenizer, path=path, max_length=12).cache_hit


def test_changed_data_file_misses(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = prepare(tmp_path, chat_tokenizer, path=path)
    write_jsonl(tmp_path / "rows.jsonl", ROWS + [{"prompt": "new ", "completion": "row"}])
    changed = prepare(tmp_path, chat_tokenizer, path=path)
    assert not changed.cache_hit and changed.stats.rows_read == first.stats.rows_read + 1


def test_changed_tokenizer_misses(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    prepare(tmp_path, chat_tokenizer, path=path)
    other = build_chat_tokenizer()
    assert prepare(tmp_path, other, path=path).cache_hit  # an identical tokenizer built again
    other.chat_template = other.chat_template + " "
    assert not prepare(tmp_path, other, path=path).cache_hit
    other_eos = build_chat_tokenizer(eos="<|im_end|>")
    assert not prepare(tmp_path, other_eos, path=path).cache_hit


def test_incomplete_entry_is_rebuilt(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = prepare(tmp_path, chat_tokenizer, path=path)
    os.remove(os.path.join(first.cache_path, "train.arrow"))
    again = prepare(tmp_path, chat_tokenizer, path=path)
    assert not again.cache_hit and again.train.to_list() == first.train.to_list()
