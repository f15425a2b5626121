"""Token classification: word tags -> sub-word labels (the tag list: classes.class_names).

Rows hold words (`tokens`) and one tag per word (`tags`). The tokenizer splits words into
sub-words (`is_split_into_words=True`, which needs a fast tokenizer for `word_ids`); the first
sub-word of each word gets the word's tag, the other sub-words and the special tokens get -100
(or, with `label_all_subwords`, every sub-word gets the tag).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import DataError, RowError
from .formats import row_problem
from ..config import IGNORE_INDEX
from .rows import TokenizedRow


def check_fast_tokenizer(tokenizer: Any) -> None:
    """Raise `DataError` unless `tokenizer` can map sub-words back to words (`word_ids`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"task 'token-cls' needs a fast tokenizer (backed by the `tokenizers` library) to align word tags "
            f"with sub-words; {type(tokenizer).__name__} is a slow one. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True), or give model.tokenizer a folder with tokenizer.json"
        )


def tokenize_word_rows(
    tokenizer: Any,
    rows: list[dict[str, Any]],
    label_index: dict[str | int, int],
    *,
    max_length: int,
    overflow: str,
    label_all_subwords: bool,
    too_long: Any,
) -> list[TokenizedRow | RowError]:
    """Tokenize checked-or-not `token_classification` rows with one tokenizer call; a bad row
    yields its `RowError` (no location). `too_long(n)` builds the overflow="error" error."""
    out: list[TokenizedRow | RowError | None] = []
    good: list[int] = []
    for k, row in enumerate(rows):
        problem = row_problem(row, "token_classification")
        out.append(RowError(problem) if problem else None)
        if not problem:
            good.append(k)
    if not good:
        return out  # type: ignore[return-value]
    encoded = tokenizer([rows[k]["tokens"] for k in good], is_split_into_words=True, add_special_tokens=True)
    for j, k in enumerate(good):
        row = rows[k]
        try:
            ids, word_ids = list(encoded["input_ids"][j]), encoded.word_ids(j)
            check_every_word_has_a_token(word_ids, row["tokens"])
            truncated = False
            if len(ids) > max_length:
                if overflow == "error":
                    raise too_long(len(ids))
                if overflow == "drop":
                    out[k] = TokenizedRow([], [], dropped=True)
                    continue
                # The tokenizer truncates inside its special tokens ([CLS] ... [SEP] stays intact);
                # a word cut after its first sub-word keeps its label.
                again = tokenizer(row["tokens"], is_split_into_words=True, add_special_tokens=True,
                                  truncation=True, max_length=max_length)
                ids, word_ids, truncated = list(again["input_ids"]), again.word_ids(), True
            labels = align_labels(word_ids, row["tags"], label_index, label_all_subwords)
            out[k] = TokenizedRow(ids, labels, truncated=truncated)
        except RowError as exc:
            out[k] = exc
    return out  # type: ignore[return-value]


def align_labels(
    word_ids: Sequence[int | None],
    tags: Sequence[str | int],
    label_index: dict[str | int, int],
    label_all_subwords: bool = False,
) -> list[int]:
    """One label per sub-word position [n] from one tag per word.

    word_ids: the word of each position (None for special tokens), as `encoding.word_ids()`.
    Raises `RowError` for a tag that is not in `label_index`.
    """
    word_labels = []
    for i, tag in enumerate(tags):
        if tag not in label_index:
            known = list(label_index)
            shown = known if len(known) <= 20 else known[:20] + ["..."]
            raise RowError(f"tags[{i}] {tag!r} does not occur in the training data; training tags: {shown}")
        word_labels.append(label_index[tag])
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous or label_all_subwords:
            labels.append(word_labels[word])
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


def check_every_word_has_a_token(word_ids: Sequence[int | None], tokens: Sequence[str]) -> None:
    """Raise `RowError` naming the first word the tokenizer turned into no sub-word at all
    (e.g. a zero-width space): its tag could never be trained or scored."""
    seen = {w for w in word_ids if w is not None}
    for i, word in enumerate(tokens):
        if i not in seen:
            raise RowError(
                f"tokens[{i}] {word!r} becomes no token with this tokenizer (whitespace or characters it drops), "
                "so its tag could not be trained; remove or clean that word"
            )
