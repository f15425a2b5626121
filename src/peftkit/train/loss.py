"""Loss functions of the training loop: `loss_fn(model, batch) -> (loss_sum, n_targets)`.

A loss function returns the SUM of the per-target losses of one micro-batch (fp32 scalar
tensor) and how many targets it summed over, so that the loop can divide by the number of
targets of the whole accumulation window (over all processes) instead of averaging means.
`count_targets` must agree with it without running the model: the loop counts a window's
targets before the first forward pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX
from ..model import PeftModel
from .data import Batch
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, torch.Tensor | int]"]


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over target tokens (labels != -100 after the shift).

    logits [B, T, V] at position t predict labels[t + 1]; logits are upcast to fp32 for the loss.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    # Prompt tuning returns logits for its virtual tokens too, in front of the real positions.
    logits = logits[:, logits.shape[1] - batch["labels"].shape[1]:]
    labels = batch["labels"][:, 1:]
    shifted = logits[:, :-1, :]
    loss_sum = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def seq_cls_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy over classes summed over the rows; one target per row."""
    loss_sum, _ = _seq_cls_logits_loss(model, batch)
    return loss_sum, batch["labels"].shape[0]


def seq_cls_eval(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(loss_sum, n_rows, n_correct) from a single forward pass."""
    loss_sum, logits = _seq_cls_logits_loss(model, batch)
    correct = (logits.argmax(dim=-1) == batch["labels"]).sum()
    return loss_sum, batch["labels"].shape[0], correct


def _seq_cls_logits_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if logits.ndim != 2 or logits.shape[-1] < 2:
        raise ValueError(
            f"sequence classification needs logits of shape [batch, num_labels >= 2], got {tuple(logits.shape)}; "
            "regression (num_labels=1) and multi-label heads are not supported by the built-in loss"
        )
    loss_sum = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return loss_sum, logits


def token_cls_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over classes summed over labelled tokens (labels != -100, no shift).

    logits [B, T, C] at position t classify token t itself; logits are upcast to fp32.
    """
    loss_sum, _, labelled = _token_cls_logits_loss(model, batch)
    return loss_sum, labelled.sum()


def token_cls_eval(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, n_labelled_tokens, n_correct) from a single forward pass; accuracy is per token."""
    loss_sum, logits, labelled = _token_cls_logits_loss(model, batch)
    correct = ((logits.argmax(dim=-1) == batch["labels"]) & labelled).sum()
    return loss_sum, labelled.sum(), correct


def _token_cls_logits_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if logits.ndim != 3 or logits.shape[:2] != labels.shape or logits.shape[-1] < 2:
        raise ValueError(
            f"token classification needs logits [batch, tokens, num_labels >= 2] matching labels "
            f"{tuple(labels.shape)}, got {tuple(logits.shape)}"
        )
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, logits, labels != IGNORE_INDEX


def count_targets(batch: Batch, task: str) -> int:
    """Targets `default_loss_fn(task)` will sum over for this batch, from the labels alone."""
    if task == "causal-lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if task == "token-cls":
        return int((batch["labels"] != IGNORE_INDEX).sum())
    return int(batch["labels"].shape[0])


def fast_causal_lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` through the model's chunked lm_head + cross-entropy where that is exact
    (no [B, T, V] logits are formed); the plain path everywhere else."""
    peft = getattr(model, "module", model)  # DDP and DeepSpeed keep the model as `.module`
    if not isinstance(peft, PeftModel) or peft.chunked_loss_blocker(batch) is not None:
        return causal_lm_loss(model, batch)
    if model.training:
        # Through forward, so that a wrapper's forward (DDP's gradient hooks, accelerate's
        # autocast) runs; num_items_in_batch=1 makes the returned loss the sum.
        loss_sum = model(**batch, num_items_in_batch=1).loss
        return loss_sum, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    if "forward" in vars(peft) and not _under_autocast(batch):
        # accelerate's mixed-precision prepare() made forward autocast(forward): outside an
        # active autocast a direct call of the split would skip it.
        return causal_lm_loss(model, batch)
    return peft.chunked_causal_lm_loss(batch)


def _under_autocast(batch: Batch) -> bool:
    device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    return torch.is_autocast_enabled(device.type)


def default_loss_fn(task: str) -> LossFn:
    if task == "causal-lm":
        return fast_causal_lm_loss
    if task == "seq-cls":
        return seq_cls_loss
    if task == "token-cls":
        return token_cls_loss
    raise ValueError(f"task={task!r}: expected 'causal-lm', 'seq-cls' or 'token-cls'")
