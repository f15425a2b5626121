"""One row -> token ids and labels, per task and format, with the overflow policy applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import IGNORE_INDEX
from .chat import chat_mask, chat_texts, generation_prompt_text
from .errors import DataError, RowError
from .formats import alpaca_prompt, normalize_label, row_problem
from .rows import TokenizedRow
from .token_cls import check_fast_tokenizer, tokenize_word_rows

__all__ = ["IGNORE_INDEX", "RowTokenizer", "TokenizedRow", "prompt_token_ids"]

class RowTokenizer:
    """Turns checked rows of one format into `TokenizedRow`s for one task.

    Raises `RowError` (no location) for a row that cannot be tokenized or, under
    `overflow="error"`, is too long.
    """

    def __init__(
        self,
        tokenizer: Any,
        task: str,
        fmt: str,
        *,
        max_length: int,
        overflow: str,
        train_on: str,
        add_eos: bool,
        system_prompt: str | None,
        label_index: dict[str | int, int] | None = None,
        label_all_subwords: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.task, self.fmt = task, fmt
        self.max_length, self.overflow = max_length, overflow
        self.train_on, self.add_eos = train_on, add_eos
        self.system_prompt = system_prompt
        self.label_index = label_index
        self.label_all_subwords = label_all_subwords
        self.eos_id = tokenizer.eos_token_id
        if task == "token-cls":
            check_fast_tokenizer(tokenizer)
        if add_eos and task in ("causal-lm", "seq2seq") and self.eos_id is None:
            raise DataError(
                "data.add_eos is true but the tokenizer has no eos_token; set tokenizer.eos_token or add_eos: false"
            )
        self.prefix_ids = _special_prefix(tokenizer)

    def __call__(self, row: dict[str, Any]) -> TokenizedRow:
        """Tokenize one row; raises `RowError`."""
        result = self.tokenize_batch([row])[0]
        if isinstance(result, RowError):
            raise result
        return result

    def tokenize_batch(self, rows: list[dict[str, Any]]) -> list[TokenizedRow | RowError]:
        """Tokenize rows with one tokenizer call per kind of text; a bad row yields its `RowError`."""
        if self.task == "token-cls":
            assert self.label_index is not None
            return tokenize_word_rows(self.tokenizer, rows, self.label_index, max_length=self.max_length,
                                      overflow=self.overflow, label_all_subwords=self.label_all_subwords,
                                      too_long=self._too_long)
        pending: list[_Pending | RowError] = []
        for row in rows:
            try:
                problem = row_problem(row, self.fmt)
                if problem:
                    raise RowError(problem)
                pending.append(self._start(row))
            except RowError as exc:
                pending.append(exc)
        plain = self._encode_many([t for p in pending if isinstance(p, _Pending) for t in p.plain], False)
        special = self._encode_many([t for p in pending if isinstance(p, _Pending) for t in p.special], True)
        out: list[TokenizedRow | RowError] = []
        a = b = 0
        for p in pending:
            if isinstance(p, RowError):
                out.append(p)
                continue
            plain_ids, special_ids = plain[a : a + len(p.plain)], special[b : b + len(p.special)]
            a, b = a + len(p.plain), b + len(p.special)
            try:
                out.append(p.finish(plain_ids, special_ids))
            except RowError as exc:
                out.append(exc)
        return out

    def _start(self, row: dict[str, Any]) -> "_Pending":
        """The texts a row needs encoded, and how to turn their ids into a `TokenizedRow`."""
        if self.task == "seq-cls":
            label = normalize_label(row["label"])
            return _Pending([], [row["text"]], lambda _, s: self._classification(row["text"], label, s[0]))
        if self.task == "seq2seq":
            prompt, completion = self._prompt_completion(row)
            return _Pending([completion], [prompt], lambda p, s: self._seq2seq(prompt, s[0], p[0]))
        if self.fmt == "messages":
            texts, turns = chat_texts(self.tokenizer, row["messages"], self.system_prompt)
            return _Pending(texts, [], lambda p, _: self._causal(*chat_mask(p, turns, self.train_on)))
        if self.fmt == "text":
            return _Pending([row["text"]], [], lambda p, _: self._causal(self.prefix_ids + list(p[0]), None))
        prompt, completion = self._prompt_completion(row)

        def finish(p: list[list[int]], _: list[list[int]]) -> TokenizedRow:
            prompt_ids = self.prefix_ids + list(p[0])
            train_prompt = self.train_on == "all"
            return self._causal(prompt_ids + list(p[1]), [train_prompt] * len(prompt_ids) + [True] * len(p[1]))

        return _Pending([prompt, completion], [], finish)

    def _causal(self, ids: list[int], trained: list[bool] | None) -> TokenizedRow:
        """Append EOS, build labels (-100 where untrained) and apply the overflow policy."""
        trained = [True] * len(ids) if trained is None else trained
        if self.add_eos and not self._ends_with_eos(ids):
            ids, trained = ids + [self.eos_id], trained + [True]
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
        # Position 0 is never predicted; masking it also keeps a packed row's first token
        # from being trained as the continuation of the row before it.
        labels[0] = IGNORE_INDEX
        return self._fit(TokenizedRow(ids, labels))

    def _seq2seq(self, prompt: str, input_ids: list[int], completion_ids: list[int]) -> TokenizedRow:
        input_ids = list(input_ids)
        labels = list(completion_ids) + ([self.eos_id] if self.add_eos else [])
        longest = max(len(input_ids), len(labels))
        if longest <= self.max_length:
            return TokenizedRow(input_ids, labels)
        if self.overflow == "error":
            raise self._too_long(longest, "prompt or target ")
        if self.overflow == "drop":
            return TokenizedRow([], [], dropped=True)
        if len(input_ids) > self.max_length:
            input_ids = self.tokenizer(prompt, add_special_tokens=True, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
        return TokenizedRow(input_ids, labels[: self.max_length], truncated=True)

    def _classification(self, text: str, label: str | int, input_ids: list[int]) -> TokenizedRow:
        assert self.label_index is not None
        if label not in self.label_index:
            known = list(self.label_index)
            shown = known if len(known) <= 20 else known[:20] + ["..."]
            raise RowError(f"label {label!r} does not occur in the training data; training labels: {shown}")
        input_ids = list(input_ids)
        if len(input_ids) <= self.max_length:
            return TokenizedRow(input_ids, self.label_index[label])
        if self.overflow == "error":
            raise self._too_long(len(input_ids))
        if self.overflow == "drop":
            return TokenizedRow([], self.label_index[label], dropped=True)
        # The tokenizer truncates inside its special tokens ([CLS] ... [SEP] stays intact).
        input_ids = self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=self.max_length)[
            "input_ids"
        ]
        return TokenizedRow(input_ids, self.label_index[label], truncated=True)

    def _prompt_completion(self, row: dict[str, Any]) -> tuple[str, str]:
        return self.prompt_text(row), row["output" if self.fmt == "alpaca" else "completion"]

    def prompt_text(self, row: dict[str, Any]) -> str:
        """The text a row of this format has before its response; `row` may lack the response
        (no output / completion, messages ending with a user turn). What generation starts from."""
        if self.fmt == "alpaca":
            return alpaca_prompt(row["instruction"], row.get("input"), self.system_prompt)
        if self.fmt == "messages":
            return generation_prompt_text(self.tokenizer, row["messages"], self.system_prompt)
        if self.fmt == "text":
            return row["text"]
        return row["prompt"] or ""

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        """The token ids a training row of this format has before its response (the same
        encoding calls as `__call__`: special-token prefix, templates, no suffix)."""
        text = self.prompt_text(row)
        if self.task == "seq2seq":
            return list(self._encode_many([text], True)[0])
        if self.fmt == "messages":  # a rendered chat carries its own special tokens
            return list(self._encode_many([text], False)[0])
        return self.prefix_ids + list(self._encode_many([text], False)[0])

    def _fit(self, row: TokenizedRow) -> TokenizedRow:
        n = len(row.input_ids)
        if n <= self.max_length:
            return row
        if self.overflow == "error":
            raise self._too_long(n)
        if self.overflow == "drop":
            return TokenizedRow([], [], dropped=True)
        return TokenizedRow(row.input_ids[: self.max_length], row.labels[: self.max_length], truncated=True)

    def _too_long(self, n: int, what: str = "") -> RowError:
        return RowError(
            f"{what}has {n} tokens, more than data.max_length={self.max_length} (data.overflow='error'; "
            "use 'truncate' or 'drop' to keep going, or raise max_length)"
        )

    def _encode_many(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def _ends_with_eos(self, ids: list[int]) -> bool:
        """True when the last EOS is followed by nothing but whitespace (e.g. a template's final newline)."""
        if self.eos_id not in ids:
            return False
        last = len(ids) - 1 - ids[::-1].index(self.eos_id)
        tail = ids[last + 1 :]
        return not tail or not self.tokenizer.decode(tail).strip()


@dataclass
class _Pending:
    """A row waiting for its texts to be encoded: `plain` without, `special` with special tokens."""

    plain: list[str]
    special: list[str]
    finish: Callable[[list[list[int]], list[list[int]]], TokenizedRow]


def prompt_token_ids(tokenizer: Any, task: str, fmt: str, row: dict[str, Any],
                     system_prompt: str | None = None) -> tuple[str, list[int]]:
    """(text, token ids) a model trained on rows of `fmt` saw before the response of `row`
    (a row without its response), rendered by the same code that tokenized the training rows."""
    rows = RowTokenizer(tokenizer, task, fmt, max_length=2**31 - 1, overflow="truncate", train_on="completion",
                        add_eos=False, system_prompt=system_prompt)
    return rows.prompt_text(row), rows.prompt_ids(row)


def _special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before text (e.g. BOS), found by encoding a probe with and without."""
    probe = "a"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []
