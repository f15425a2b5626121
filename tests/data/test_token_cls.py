"""Token classification rows: word tags aligned to sub-words, tag names, errors, overflow, cache."""

from __future__ import annotations

import datasets
import pytest
import torch
from datahelpers import prepare, write_jsonl

from peftkit.data import IGNORE_INDEX, DataError, preview

WORDS = ["Johannesburg", "hosts", "the", "Nederlandse", "Spoorwegen", "tokenization"]
TAGS = ["B-LOC", "O", "O", "B-ORG", "I-ORG", "O"]
# What all-MiniLM-L6-v2's WordPiece makes of WORDS: 1, 1, 1, 3, 4 and 2 sub-words.
PIECES = ["[CLS]", "johannesburg", "hosts", "the", "ned", "##erland", "##se", "sp", "##oor", "##we", "##gen",
          "token", "##ization", "[SEP]"]
NAMES = ["B-LOC", "B-ORG", "I-ORG", "O"]  # sorted tag names: the class ids 0..3
X = IGNORE_INDEX
FIRST_SUBWORD = [X, 0, 3, 3, 1, X, X, 2, X, X, X, 3, X, X]
ALL_SUBWORDS = [X, 0, 3, 3, 1, 1, 1, 2, 2, 2, 2, 3, 3, X]
SHORT = {"tokens": ["Paris", "sleeps"], "tags": ["B-LOC", "O"]}


def _prepare(tmp_path, tokenizer, **settings):
    return prepare(tmp_path, tokenizer, "token-cls", **settings)


def test_first_subword_of_each_word_carries_its_tag(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": WORDS, "tags": TAGS}])
    data = _prepare(tmp_path, bert_tokenizer, path=path)
    row = data.train[0]
    assert bert_tokenizer.convert_ids_to_tokens(row["input_ids"]) == PIECES
    assert row["labels"] == FIRST_SUBWORD
    assert data.format == "token_classification" and data.label_names == NAMES
    assert data.id2label == dict(enumerate(NAMES)) and data.num_labels == 4
    s = data.stats
    assert (s.rows_read, s.examples, s.total_tokens, s.trained_tokens) == (1, 1, 14, 6)  # one tagged sub-word per word
    assert "data: task token-cls, format token_classification" in data.summary()
    assert not data.add_eos  # the BERT tokenizer has no EOS, and token-cls never appends one


def test_label_all_subwords_tags_every_subword_and_is_part_of_the_cache_key(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": WORDS, "tags": TAGS}])
    first = _prepare(tmp_path, bert_tokenizer, path=path)
    every = _prepare(tmp_path, bert_tokenizer, path=path, label_all_subwords=True)
    again = _prepare(tmp_path, bert_tokenizer, path=path)
    assert every.train[0]["labels"] == ALL_SUBWORDS and every.stats.trained_tokens == 12
    assert (first.cache_hit, every.cache_hit, again.cache_hit) == (False, False, True)
    assert every.cache_path != first.cache_path == again.cache_path


def test_ner_tags_is_read_as_tags_and_integer_tags_name_classes_by_index(tmp_path, bert_tokenizer):
    rows = [{"id": "0", "tokens": ["Alice", "slept"], "ner_tags": [1, 0]}, {"tokens": ["in", "Rome"], "ner_tags": [0, 3]}]
    data = _prepare(tmp_path, bert_tokenizer, path=write_jsonl(tmp_path / "conll.jsonl", rows))
    assert data.label_names == ["0", "1", "2", "3"]
    assert [r["labels"] for r in data.train] == [[X, 1, 0, X], [X, 0, 3, X]]


def test_classlabel_tags_of_a_saved_dataset_keep_their_names(tmp_path, bert_tokenizer):
    names = ["O", "B-PER", "I-PER"]
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=names))})
    dataset = datasets.Dataset.from_dict({"tokens": [["Ada", "Lovelace", "wrote"]], "ner_tags": [[1, 2, 0]]},
                                         features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    data = _prepare(tmp_path, bert_tokenizer, path=str(tmp_path / "saved"))
    assert data.label_names == names  # the dataset's order, not sorted
    pieces = bert_tokenizer.convert_ids_to_tokens(data.train[0]["input_ids"])
    first = [i for i, p in enumerate(pieces) if p not in ("[CLS]", "[SEP]") and not p.startswith("##")]
    assert [data.train[0]["labels"][i] for i in first] == [1, 2, 0]


def test_column_mapping_names_other_columns(tmp_path, bert_tokenizer):
    rows = [{"words": ["Alice", "slept"], "labels": ["B-PER", "O"]}]
    data = _prepare(tmp_path, bert_tokenizer, path=write_jsonl(tmp_path / "r.jsonl", rows),
                    column_mapping={"words": "tokens", "labels": "tags"})
    assert data.label_names == ["B-PER", "O"] and data.train[0]["labels"] == [X, 0, 1, X]


def test_collator_pads_input_ids_and_labels(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": WORDS, "tags": TAGS}, SHORT])
    data = _prepare(tmp_path, bert_tokenizer, path=path)
    batch = data.collator([data.train[0], data.train[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].tolist() == [FIRST_SUBWORD, [X, 0, 3, X] + [X] * 10]
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 10
    assert batch["input_ids"][1, 4:].eq(bert_tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.long


def test_preview_shows_each_word_with_its_tag(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": WORDS, "tags": TAGS}, SHORT])
    report = preview(_prepare(tmp_path, bert_tokenizer, path=path), bert_tokenizer, n=2)
    assert report.ok
    assert report.examples == [
        "[CLS] johannesburg/B-LOC hosts/O the/O nederlandse/B-ORG spoorwegen/I-ORG tokenization/O [SEP]",
        "[CLS] paris/B-LOC sleeps/O [SEP]",
    ]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "field 'tags' has 1 entries but 'tokens' has 2 words; give one tag per word"),
        ({"tokens": "a b", "tags": ["O", "O"]}, "field 'tokens' is a str ('a b'), expected a list of words (strings)"),
        ({"tokens": ["a"], "tags": "O"}, "field 'tags' is a str ('O'), expected a list of tags, one per word"),
        ({"tokens": ["a", 7], "tags": ["O", "O"]}, "tokens[1] is an int (7), expected a word (string)"),
        ({"tokens": ["a", ""], "tags": ["O", "O"]}, "tokens[1] is an empty string"),
        ({"tokens": [], "tags": []}, "field 'tokens' is an empty list"),
        ({"tokens": ["a", "b"], "tags": ["O", -1]},
         "tags[1] is an int (-1), expected a tag name (non-empty string) or class index (integer >= 0)"),
        ({"tokens": ["a", "b"], "tags": ["O", 1]},
         "field 'tags' mixes tag names (strings) and class indices (integers); use one kind"),
        ({"tokens": ["a"]}, "missing field 'tags'"),
    ],
)
def test_malformed_rows_name_file_line_and_problem(tmp_path, bert_tokenizer, row, problem):
    path = write_jsonl(tmp_path / "ner.jsonl", [SHORT, SHORT, row])
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, bert_tokenizer, path=path)
    assert str(info.value) == f"{path}, line 3: {problem}"


def test_tag_kinds_must_agree_across_lines(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [SHORT, {"tokens": ["a"], "tags": [0]}])
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, bert_tokenizer, path=path)
    assert str(info.value) == (f"{path}, line 2: tags are class indices (integers) but line 1 has tag names "
                               "(strings); use names or class indices throughout")


def test_a_word_that_becomes_no_token_is_an_error(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [SHORT, {"tokens": ["Paris", "\u200b", "sleeps"],
                                                        "tags": ["B-LOC", "O", "O"]}])
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, bert_tokenizer, path=path)
    shown = repr("\u200b")  # the message shows the invisible word escaped: '\\u200b'
    assert str(info.value).startswith(f"{path}, line 2: tokens[1] {shown} becomes no token with this tokenizer")


def test_eval_tag_not_in_the_training_tags(tmp_path, bert_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [SHORT])
    evals = write_jsonl(tmp_path / "eval.jsonl", [SHORT, {"tokens": ["Alice", "sleeps"], "tags": ["B-PER", "O"]}])
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, bert_tokenizer, path=train, eval_path=evals)
    assert str(info.value) == (f"{evals}, line 2: tags[0] 'B-PER' does not occur in the training data; "
                               "training tags: ['B-LOC', 'O']")


def test_settings_that_do_not_apply_to_token_cls_are_refused(tmp_path, bert_tokenizer, chat_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [SHORT])
    with pytest.raises(DataError, match="data.packing: packing is only for task 'causal-lm', not 'token-cls'"):
        _prepare(tmp_path, bert_tokenizer, path=path, packing=True)
    with pytest.raises(DataError, match="data.label_all_subwords: only applies to task 'token-cls'"):
        prepare(tmp_path, chat_tokenizer, "causal-lm", path=write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}]),
                label_all_subwords=True)
    with pytest.raises(DataError, match="data.format 'token_classification' cannot be used for task 'seq-cls'"):
        prepare(tmp_path, bert_tokenizer, "seq-cls", path=path, format="token_classification")
    with pytest.raises(DataError, match=r"cannot detect the row format for task 'token-cls' .* "
                                        r"token_classification: tokens \+ tags"):
        _prepare(tmp_path, bert_tokenizer, path=write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}]))


class _SlowTokenizer:
    """The real tokenizer, reporting itself as a slow (pure Python) one without word_ids."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def __len__(self):
        return len(self._inner)


def test_a_slow_tokenizer_is_refused_with_what_to_do(tmp_path, bert_tokenizer):
    path = write_jsonl(tmp_path / "ner.jsonl", [SHORT])
    with pytest.raises(DataError, match=r"task 'token-cls' needs a fast tokenizer .* _SlowTokenizer is a slow one. "
                                        r"Load it with AutoTokenizer.from_pretrained\(..., use_fast=True\)"):
        _prepare(tmp_path, _SlowTokenizer(bert_tokenizer), path=path)


def test_truncate_drop_and_error_with_counts(tmp_path, bert_tokenizer):
    long = {"tokens": WORDS, "tags": TAGS}  # 14 tokens with [CLS] and [SEP]
    path = write_jsonl(tmp_path / "ner.jsonl", [SHORT, long, SHORT, long])

    cut = _prepare(tmp_path, bert_tokenizer, path=path, max_length=9)
    s = cut.stats
    assert (s.rows_read, s.rows_dropped, s.rows_truncated, s.examples) == (4, 0, 2, 4)
    row = cut.train[1]
    # [CLS] + the first 7 sub-words + [SEP]: "spoorwegen" is cut after "sp", which keeps its tag.
    assert bert_tokenizer.convert_ids_to_tokens(row["input_ids"]) == PIECES[:7] + ["sp", "[SEP]"]
    assert row["labels"] == FIRST_SUBWORD[:8] + [X]
    assert (s.total_tokens, s.trained_tokens) == (4 + 9 + 4 + 9, 2 + 5 + 2 + 5)

    dropped = _prepare(tmp_path, bert_tokenizer, path=path, max_length=9, overflow="drop")
    s = dropped.stats
    assert (s.rows_read, s.rows_dropped, s.rows_truncated, s.examples, s.total_tokens) == (4, 2, 0, 2, 8)

    with pytest.raises(DataError) as info:
        _prepare(tmp_path, bert_tokenizer, path=path, max_length=9, overflow="error")
    assert str(info.value) == (f"{path}, line 2: has 14 tokens, more than data.max_length=9 (data.overflow='error'; "
                               "use 'truncate' or 'drop' to keep going, or raise max_length)")
