"""Sources: JSONL / JSON / CSV / Parquet files, save_to_disk folders, plain folders, eval hold-out."""

from __future__ import annotations

import datasets
import pytest
from datahelpers import prepare, write_jsonl

from peftkit.data import DataError

ROWS = [{"prompt": f"row {i} says ", "completion": f"hello {i}"} for i in range(20)]


def _ids(data):
    return [r["input_ids"] for r in data.train]


def test_every_file_type_gives_the_same_tokens(tmp_path, chat_tokenizer):
    reference = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "rows.jsonl", ROWS))
    table = datasets.Dataset.from_list(ROWS)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    table.to_json(str(tmp_path / "rows.json"), lines=False)
    table.save_to_disk(str(tmp_path / "saved"))
    for name in ("rows.parquet", "rows.csv", "rows.json", "saved"):
        data = prepare(tmp_path, chat_tokenizer, path=str(tmp_path / name))
        assert data.format == "prompt_completion", name
        assert _ids(data) == _ids(reference), name
        assert data.stats == reference.stats, name


def test_saved_dataset_dict_uses_split_and_validation_for_eval(tmp_path, chat_tokenizer):
    folder = str(tmp_path / "dd")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:15]), "validation": datasets.Dataset.from_list(ROWS[15:])}
    ).save_to_disk(folder)
    data = prepare(tmp_path, chat_tokenizer, path=folder, eval_path=folder)
    assert (data.stats.rows_read, data.eval_stats.rows_read) == (15, 5)
    assert chat_tokenizer.decode(data.eval[0]["input_ids"]) == "<s>row 15 says hello 15<|endoftext|>"
    with pytest.raises(DataError, match=r"has splits \['train', 'validation'\], none of them 'dev'; set data.split"):
        prepare(tmp_path, chat_tokenizer, path=folder, split="dev")


def test_folder_and_list_of_files(tmp_path, chat_tokenizer):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ROWS[10:])
    write_jsonl(folder / "a.jsonl", ROWS[:10])
    from_folder = prepare(tmp_path, chat_tokenizer, path=str(folder))
    from_list = prepare(tmp_path, chat_tokenizer, path=[str(folder / "a.jsonl"), str(folder / "b.jsonl")])
    assert from_folder.stats.rows_read == 20 and _ids(from_folder) == _ids(from_list)
    assert chat_tokenizer.decode(from_folder.train[10]["input_ids"]) == "<s>row 10 says hello 10<|endoftext|>"


def test_mixed_formats_across_files_are_an_error(tmp_path, chat_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "hello"}])
    expected = "data sources have different row formats .*a.jsonl: prompt_completion, .*b.jsonl: text"
    with pytest.raises(DataError, match=expected):
        prepare(tmp_path, chat_tokenizer, path=[a, b])


def test_eval_split_is_seeded_and_disjoint(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = prepare(tmp_path, chat_tokenizer, path=path, eval_split=0.25, seed=1)
    again = prepare(tmp_path, chat_tokenizer, path=path, eval_split=0.25, seed=1, cache_dir=str(tmp_path / "other"))
    other_seed = prepare(tmp_path, chat_tokenizer, path=path, eval_split=0.25, seed=2)
    assert (first.stats.rows_read, first.eval_stats.rows_read) == (15, 5)
    assert not again.cache_hit and [r["input_ids"] for r in again.eval] == [r["input_ids"] for r in first.eval]
    texts = lambda d: {chat_tokenizer.decode(r["input_ids"]) for r in d}  # noqa: E731
    assert texts(first.train).isdisjoint(texts(first.eval))
    assert len(texts(first.train) | texts(first.eval)) == 20
    assert texts(other_seed.eval) != texts(first.eval)


def test_eval_split_too_small_is_an_error(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:3])
    with pytest.raises(DataError, match="data.eval_split=0.1 of 3 training rows holds out 0"):
        prepare(tmp_path, chat_tokenizer, path=path, eval_split=0.1)


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, chat_tokenizer):
    with pytest.raises(DataError, match="'someone/some-data' is not a local file or folder, and loading it as a"):
        prepare(tmp_path, chat_tokenizer, path="someone/some-data")


def test_chat_rows_from_parquet_match_jsonl(tmp_path, chat_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(4)
    ]
    reference = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "chat.jsonl", rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    data = prepare(tmp_path, chat_tokenizer, path=str(tmp_path / "chat.parquet"))
    assert data.format == "messages" and data.train.to_list() == reference.train.to_list()


def test_class_label_feature_names_are_used(tmp_path, bert_tokenizer):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["sad", "happy", "calm"])}
    )
    table = datasets.Dataset.from_dict({"text": ["yay", "meh", "ugh"], "label": [1, 2, 0]}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    data = prepare(tmp_path, bert_tokenizer, "seq-cls", path=str(tmp_path / "saved"))
    assert data.label_names == ["sad", "happy", "calm"]  # the dataset's order, not sorted
    assert [r["labels"] for r in data.train] == [1, 2, 0]


def test_system_prompt_needs_a_format_that_uses_it(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:2])
    with pytest.raises(DataError, match="data.system_prompt: only the messages and alpaca formats use it; the data is"):
        prepare(tmp_path, chat_tokenizer, path=path, system_prompt="Be brief.")
