"""Malformed rows are errors naming the file, the line (or row) and the problem."""

from __future__ import annotations

import pytest
from datahelpers import prepare, write_jsonl

from peftkit.data import DataError

GOOD = {"prompt": "one ", "completion": "two"}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"prompt": "one ", "completion": }', "invalid JSON: Expecting value (column 34)"),
        ('{"prompt": "one "}', "missing field 'completion'"),
        ('{"prompt": "one ", "completion": 5}', "field 'completion' is an int (5), expected a string"),
        ('["one", "two"]', "expected a JSON object (one row), found a list"),
    ],
)
def test_jsonl_row_errors_name_file_and_line(tmp_path, chat_tokenizer, bad_line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_tokenizer, path=path)
    assert str(info.value) == f"{path}, line 4: {problem}"


def test_messages_not_a_list(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_OK, {"messages": "hi there"}])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_tokenizer, path=path)
    assert str(info.value) == (
        f"{path}, line 2: field 'messages' is a str ('hi there'), expected a list of {{role, content}} objects"
    )


def test_message_without_content(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_OK, CHAT_OK, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 3: messages\[0\]\.content is missing, expected a string"):
        prepare(tmp_path, chat_tokenizer, path=path)


def test_label_missing(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, bert_tokenizer, "seq-cls", path=path)
    assert str(info.value) == f"{path}, line 2: missing field 'label'"


def test_mixed_label_kinds(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": 1}])
    expected = r"line 2: label 1 is a class index \(integer\) but line 1 has a class name \(string\)"
    with pytest.raises(DataError, match=expected):
        prepare(tmp_path, bert_tokenizer, "seq-cls", path=path)


def test_eval_label_not_in_training_labels(tmp_path, bert_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "z"}])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, bert_tokenizer, "seq-cls", path=train, eval_path=evals)
    assert str(info.value) == (
        f"{evals}, line 1: label 'z' does not occur in the training data; training labels: ['x', 'y']"
    )


def test_json_array_error_has_line_number(tmp_path, chat_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a ", "completion": "b"},\n\n  {"prompt": "c "}\n]\n')
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_tokenizer, path=str(path))
    assert str(info.value) == f"{path}, line 4: missing field 'completion'"


def test_csv_missing_cell_names_row(tmp_path, chat_tokenizer):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\none ,two\nthree ,\n")
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_tokenizer, path=str(path))
    assert str(info.value) == f"{path}, row 2: missing field 'completion'"


def test_empty_completion_is_an_error(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": ""}])
    with pytest.raises(DataError, match=r"line 1: field 'completion' is an empty string"):
        prepare(tmp_path, chat_tokenizer, path=path)


def test_missing_file_and_unsupported_type(tmp_path, chat_tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        prepare(tmp_path, chat_tokenizer, path=str(tmp_path / "nope.jsonl"))
    other = tmp_path / "rows.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; accepted: \.jsonl, \.json, \.csv, \.parquet"):
        prepare(tmp_path, chat_tokenizer, path=str(other))
