"""A tokenized row: what the tokenizers of every task produce."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import IGNORE_INDEX


@dataclass
class TokenizedRow:
    """input_ids [n]; labels [n] (causal-lm, token-cls), [m] target ids (seq2seq) or a class index (seq-cls)."""

    input_ids: list[int]
    labels: list[int] | int
    truncated: bool = False
    dropped: bool = False

    @property
    def trained_tokens(self) -> int:
        if isinstance(self.labels, int):
            return 0
        return sum(1 for label in self.labels if label != IGNORE_INDEX)
