"""Preview: trained tokens marked, and the checks that fail loudly."""

from __future__ import annotations

import dataclasses

import datasets
import pytest
from datahelpers import build_chat_tokenizer, prepare, write_jsonl
from transformers import DataCollatorForLanguageModeling

from peftkit.data import DataError, preview, render_example

ROWS = [{"prompt": "What is the capital of France? ", "completion": "Paris."}, {"prompt": "one ", "completion": "two"}]


def test_render_marks_trained_spans(tmp_path, chat_tokenizer):
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "rows.jsonl", ROWS))
    report = preview(data, chat_tokenizer, n=2)
    assert report.ok and report.warnings == []
    assert report.examples == [
        "<s>What is the capital of France? [[Paris.<|endoftext|>]]",
        "<s>one [[two<|endoftext|>]]",
    ]
    assert "--- example 2 ---\n<s>one [[two<|endoftext|>]]" in report.text()
    colored = render_example(chat_tokenizer, data.train[1]["input_ids"], data.train[1]["labels"], style="color")
    assert colored == "<s>one \x1b[32mtwo<|endoftext|>\x1b[0m"


def test_packed_rows_are_shown_one_by_one(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    data = prepare(tmp_path, chat_tokenizer, path=path, packing=True, max_length=64)
    assert len(data.train) == 1
    report = preview(data, chat_tokenizer, n=5)
    assert report.ok and len(report.examples) == 2
    assert set(report.examples) == {
        "<s>What is the capital of France? [[Paris.<|endoftext|>]]",
        "<s>one [[two<|endoftext|>]]",
    }


def test_example_with_no_trained_token_fails(tmp_path, chat_tokenizer):
    rows = [{"prompt": "one two three four five six seven eight nine ten ", "completion": "Paris."}]
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "rows.jsonl", rows), max_length=6)
    assert data.stats.rows_without_trained_tokens == 1
    report = preview(data, chat_tokenizer)
    assert "train example 1 has no trained token" in report.problems[0]
    assert "1 of 1 train rows have no trained token" in report.problems[1]
    with pytest.raises(DataError, match="data preview found problems:\n  train example 1 has no trained token"):
        report.raise_for_problems()


def test_untrained_eos_fails(tmp_path, chat_tokenizer):
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "rows.jsonl", ROWS))
    rows = data.train.to_list()
    rows[0]["labels"][-1] = -100
    broken = dataclasses.replace(data, train=datasets.Dataset.from_list(rows))
    report = preview(broken, chat_tokenizer)
    assert report.problems == [
        "train example 1 ends with EOS '<|endoftext|>' but it is not trained (label -100), "
        "so the model never learns to stop"
    ]
    rows[0]["input_ids"] = rows[0]["input_ids"][:-1]
    rows[0]["labels"] = rows[0]["labels"][:-1]
    report = preview(dataclasses.replace(data, train=datasets.Dataset.from_list(rows)), chat_tokenizer)
    assert report.problems == ["train example 1 does not end with the EOS token '<|endoftext|>' (id 1)"]


def test_pad_equal_to_eos_warns_and_fails_with_a_pad_masking_collator(tmp_path):
    tokenizer = build_chat_tokenizer(pad=None)
    tokenizer.pad_token = tokenizer.eos_token
    data = prepare(tmp_path, tokenizer, path=write_jsonl(tmp_path / "rows.jsonl", ROWS))
    ours = preview(data, tokenizer)
    assert ours.ok
    assert ours.warnings == [
        "pad_token_id == eos_token_id (1): a collator that masks labels by pad id also masks the EOS label"
    ]
    masking = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    report = preview(data, tokenizer, collator=lambda rows: masking([{"input_ids": r["input_ids"]} for r in rows]))
    last = len(data.train[0]["input_ids"]) - 1
    assert len(report.problems) == 1
    assert report.problems[0].startswith(
        f"pad_token_id == eos_token_id (1) and the collator masked a trained EOS label (example 1, position {last} "
        "became -100)"
    )


def test_classification_preview_shows_label_names(tmp_path, bert_tokenizer):
    rows = [{"text": "great movie", "label": "pos"}, {"text": "awful", "label": "neg"}]
    data = prepare(tmp_path, bert_tokenizer, "seq-cls", path=write_jsonl(tmp_path / "cls.jsonl", rows))
    report = preview(data, bert_tokenizer, n=2)
    assert report.ok
    assert report.examples == ["[CLS] great movie [SEP]\n=> label pos", "[CLS] awful [SEP]\n=> label neg"]
    with pytest.raises(DataError, match="preview split 'eval' is not available; choose 'train' \\(there is no eval"):
        preview(data, bert_tokenizer, split="eval")
