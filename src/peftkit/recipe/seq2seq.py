"""Training encoder-decoder models with the built-in loop, which knows causal-lm and seq-cls.

The loop counts a window's targets before any forward pass with its causal-LM rule
(labels[:, 1:] != -100, since a causal LM never predicts position 0) and checks that the
loss function summed over exactly that many. Seq2seq labels are all predicted, so the
collate prepends one ignored column: the loop's count then equals the real number of
target tokens, and `seq2seq_loss` drops the column again before the model sees it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX


def seq2seq_collate(collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
    """Wrap the data pipeline's seq2seq collator: labels [B, T] -> [B, 1 + T] (first column -100)."""

    def wrapped(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(rows)
        labels = batch["labels"]
        ignored = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
        batch["labels"] = torch.cat([ignored, labels], dim=1)
        return batch

    return wrapped


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the target tokens; the model shifts labels into decoder inputs."""
    labels = batch["labels"][:, 1:].contiguous()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, labels=labels, use_cache=False).logits
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()
