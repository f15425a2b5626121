"""Row formats: detection, rendering and which tokens are trained."""

from __future__ import annotations

import pytest
from datahelpers import build_chat_tokenizer, prepare, trained_text, write_jsonl

from peftkit.data import IGNORE_INDEX, DataError, alpaca_prompt

CHAT = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "I am fine"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


def test_text_rows_train_every_token_after_the_first(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}])
    data = prepare(tmp_path, chat_tokenizer, path=path)
    assert data.format == "text"
    row = data.train[0]
    expected = [chat_tokenizer.bos_token_id] + chat_tokenizer("The quick brown fox.", add_special_tokens=False)[
        "input_ids"
    ] + [chat_tokenizer.eos_token_id]
    assert row["input_ids"] == expected
    assert row["labels"] == [IGNORE_INDEX] + expected[1:]


def test_prompt_completion_trains_exactly_completion_and_eos(tmp_path, chat_tokenizer):
    rows = [
        {"prompt": "What is the capital of France? ", "completion": "Paris is the capital."},
        {"prompt": "one two", "completion": " three four"},
    ]
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "pc.jsonl", rows))
    assert data.format == "prompt_completion"
    for row, source in zip(data.train, rows):
        assert trained_text(chat_tokenizer, row) == source["completion"] + "<|endoftext|>"
        whole = "<s>" + source["prompt"] + source["completion"] + "<|endoftext|>"
        assert chat_tokenizer.decode(row["input_ids"]) == whole
    assert data.stats.trained_tokens == sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in data.train)


def test_train_on_all_trains_the_prompt_too(tmp_path, chat_tokenizer):
    rows = [{"prompt": "one two ", "completion": "three"}]
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "pc.jsonl", rows), train_on="all")
    row = data.train[0]
    assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_alpaca_uses_the_standard_prompt_with_and_without_input(tmp_path, chat_tokenizer):
    rows = [
        {"instruction": "Name a color.", "input": "sky", "output": "Blue"},
        {"instruction": "Count to three.", "output": "one two three"},
    ]
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "a.jsonl", rows))
    assert data.format == "alpaca"
    first, second = data.train[0], data.train[1]
    assert chat_tokenizer.decode(first["input_ids"]) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nName a color.\n\n"
        "### Input:\nsky\n\n### Response:\nBlue<|endoftext|>"
    )
    assert chat_tokenizer.decode(second["input_ids"]) == (
        "<s>" + alpaca_prompt("Count to three.", None) + "one two three<|endoftext|>"
    )
    assert "### Input" not in alpaca_prompt("Count to three.", "")
    assert trained_text(chat_tokenizer, first) == "Blue<|endoftext|>"
    assert trained_text(chat_tokenizer, second) == "one two three<|endoftext|>"


def test_alpaca_system_prompt_is_prepended(tmp_path, chat_tokenizer):
    rows = [{"instruction": "Name a color.", "output": "Blue"}]
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "a.jsonl", rows), system_prompt="Be brief.")
    text = chat_tokenizer.decode(data.train[0]["input_ids"])
    assert text.startswith("<s>Be brief.\n\nBelow is an instruction")


def test_messages_train_only_assistant_turns(tmp_path, chat_tokenizer):
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    assert data.format == "messages"
    row = data.train[0]
    rendered = chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert chat_tokenizer.decode(row["input_ids"]) == rendered + "<|endoftext|>"
    assert trained_text(chat_tokenizer, row) == "I am fine<|im_end|>\nParis<|im_end|>\n<|endoftext|>"
    # the untrained part is exactly the user turns and the assistant headers
    untrained = [i for i, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
    assert chat_tokenizer.decode(untrained) == (
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_messages_eos_not_duplicated_when_template_ends_with_it(tmp_path):
    tokenizer = build_chat_tokenizer(eos="<|im_end|>")
    data = prepare(tmp_path, tokenizer, path=write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]))
    row = data.train[0]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert trained_text(tokenizer, row) == "I am fine<|im_end|>\nParis<|im_end|>\n"


def test_messages_system_prompt_added_when_missing(tmp_path, chat_tokenizer):
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "Own."}] + CHAT[:2]}]
    data = prepare(tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "c.jsonl", rows), system_prompt="Be brief.")
    first, second = (chat_tokenizer.decode(r["input_ids"]) for r in data.train)
    assert first.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there")
    assert second.startswith("<|im_start|>system\nOwn.<|im_end|>\n<|im_start|>user") and "Be brief" not in second


def test_template_that_is_not_prefix_consistent_is_a_clear_error(tmp_path):
    tokenizer = build_chat_tokenizer()
    # The generation prompt says "assistant\n" but a rendered assistant turn says "bot\n".
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + ('bot' if m['role'] == 'assistant' else m['role']) + '\n' "
        "+ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, tokenizer, path=path)
    message = str(info.value)
    assert message.startswith(f"{path}, line 1: the chat template is not prefix-consistent")
    assert "messages[:1] with add_generation_prompt=True" in message


def test_tokenizer_without_chat_template_is_named(tmp_path):
    tokenizer = build_chat_tokenizer()
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="line 1: the tokenizer has no chat_template"):
        prepare(tmp_path, tokenizer, path=path)


def test_conversation_must_end_with_assistant(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    with pytest.raises(DataError, match=r"c\.jsonl, line 2: conversation ends with a 'user' message"):
        prepare(tmp_path, chat_tokenizer, path=path)


def test_detection_priority_and_explicit_format_override(tmp_path, chat_tokenizer):
    rows = [{"text": "plain text row", "prompt": "one ", "completion": "two"}]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    assert prepare(tmp_path, chat_tokenizer, path=path).format == "prompt_completion"
    forced = prepare(tmp_path, chat_tokenizer, path=path, format="text")
    assert forced.format == "text"
    assert chat_tokenizer.decode(forced.train[0]["input_ids"]) == "<s>plain text row<|endoftext|>"


def test_column_mapping_renames_user_columns(tmp_path, chat_tokenizer):
    rows = [{"question": "Capital of France? ", "answer": "Paris", "id": 7}]
    data = prepare(
        tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "qa.jsonl", rows),
        column_mapping={"question": "prompt", "answer": "completion"},
    )  # fmt: skip
    assert data.format == "prompt_completion"
    assert trained_text(chat_tokenizer, data.train[0]) == "Paris<|endoftext|>"
    with pytest.raises(DataError, match=r"column\(s\) \['questio'\] are not in any data source"):
        prepare(
            tmp_path, chat_tokenizer, path=write_jsonl(tmp_path / "qa.jsonl", rows),
            column_mapping={"questio": "prompt", "answer": "completion", "question": "text"},
        )  # fmt: skip


def test_undetectable_columns_list_what_each_format_needs(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_tokenizer, path=path)
    message = str(info.value)
    assert "cannot detect the row format for task 'causal-lm' from columns ['question', 'answer']" in message
    assert "prompt_completion: prompt + completion" in message and "column_mapping" in message


def test_classification_with_string_labels(tmp_path, bert_tokenizer):
    rows = [
        {"text": "great movie", "label": "pos"},
        {"text": "awful", "label": "neg"},
        {"text": "meh", "label": "neutral"},
    ]
    data = prepare(tmp_path, bert_tokenizer, "seq-cls", path=write_jsonl(tmp_path / "cls.jsonl", rows))
    assert data.format == "classification"
    assert data.label_names == ["neg", "neutral", "pos"] and data.num_labels == 3
    assert data.id2label == {0: "neg", 1: "neutral", 2: "pos"} and data.label2id["pos"] == 2
    assert [r["labels"] for r in data.train] == [2, 0, 1]
    assert data.train[0]["input_ids"] == bert_tokenizer("great movie")["input_ids"]
    batch = data.collator([data.train[i] for i in range(3)])
    assert batch["labels"].tolist() == [2, 0, 1] and batch["labels"].dtype.is_floating_point is False


def test_classification_with_integer_labels_from_csv(tmp_path, bert_tokenizer):
    path = tmp_path / "cls.csv"
    path.write_text("sentence,target\ngood,1\nbad,0\nfine,3\n")
    data = prepare(
        tmp_path, bert_tokenizer, "seq-cls", path=str(path), column_mapping={"sentence": "text", "target": "label"}
    )
    assert data.label_names == ["0", "1", "2", "3"]
    assert [r["labels"] for r in data.train] == [1, 0, 3]


def test_seq2seq_targets_are_completion_tokens(tmp_path, chat_tokenizer):
    rows = [{"prompt": "Translate to German: good morning.", "completion": "Guten Morgen."}]
    data = prepare(tmp_path, chat_tokenizer, "seq2seq", path=write_jsonl(tmp_path / "s.jsonl", rows))
    row = data.train[0]
    assert row["input_ids"] == chat_tokenizer(rows[0]["prompt"])["input_ids"]
    assert chat_tokenizer.decode(row["labels"]) == "Guten Morgen.<|endoftext|>"
    batch = data.collator([row, row])
    assert batch["labels"].shape == (2, len(row["labels"]))
