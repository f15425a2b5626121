"""One optimizer step over an accumulation window, and one eval pass.

The loss of a step is sum(target losses) / (targets in the window over all processes): each
process backpropagates loss_sum * num_processes / window_targets, and DDP's gradient
average divides the num_processes back out, so P processes x m rows x k micro-steps give
the gradients of one batch of P*m*k rows.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..checkpoint.sharded import gather_full
from .data import Batch, CollateFn, DataPlan
from .deepspeed_zero import is_deepspeed
from .logging import perplexity
from .loss import LossFn, default_loss_fn, seq_cls_eval, token_cls_eval
from .state import NonFiniteGradError, NonFiniteLossError

Rows = Sequence[Mapping[str, Any]]
MicroBatch = tuple[Batch, bool]  # (batch on device, filler: a process with no row, weighted 0)


def load_micro_batch(data: Rows, indices: list[int], collate: CollateFn, device: torch.device) -> MicroBatch:
    """Collate rows `indices` onto `device`; no indices gives row 0 as a zero-weight filler,
    so that every process runs the same number of forward/backward passes (collectives match)."""
    filler = not indices
    batch = collate([data[i] for i in (indices or [0])])
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, filler


def optimizer_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro: list[MicroBatch],
    loss_fn: LossFn,
    count_fn: Callable[[Batch], int],
    trainable: list[torch.nn.Parameter],
    max_grad_norm: float | None,
    step: int,
    last_checkpoint: Path | None,
) -> dict[str, float]:
    """Forward/backward every micro-batch of one window, clip, step. `step` is 1-based.

    Returns loss (mean per target), loss_sum, targets, tokens (non-padding, all processes),
    lr (the rate this step used), grad_norm (before clipping) and, on the steps `measures_update`
    picks, update_ratio (how far the step moved the trainable weights: ||w_after - w_before|| /
    ||w_before||). Raises NonFiniteLossError
    or NonFiniteGradError before touching the weights when the loss or the gradient norm is NaN
    or infinite.
    """
    device = accelerator.device
    deepspeed = is_deepspeed(accelerator)
    # The weights before the update: taken just before optimizer.step(), when the step's
    # activations are gone; under DeepSpeed, which updates inside the last backward, before it.
    before = _snapshot(trainable) if deepspeed and measures_update(step) else None
    # Count the window's targets over all processes before any forward pass: every
    # micro-batch's loss is divided by this one number.
    counts = [0 if filler else count_fn(batch) for batch, filler in micro]
    tokens = sum(_real_tokens(batch) for batch, filler in micro if not filler)
    totals = accelerator.reduce(torch.tensor([sum(counts), tokens], dtype=torch.float64, device=device), "sum")
    window_targets, window_tokens = float(totals[0]), float(totals[1])
    if window_targets == 0:
        warnings.warn(
            f"step {step}: no target in the whole window (every label is -100); the step only decays",
            stacklevel=3,
        )
    scale = accelerator.num_processes / max(window_targets, 1.0)
    if deepspeed:
        scale *= len(micro)  # DeepSpeed divides each micro-batch's loss by its accumulation steps

    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    returned_targets = 0
    for i, (batch, filler) in enumerate(micro):
        last = i == len(micro) - 1
        # Gradients are all-reduced once per window, in the backward of its last micro-batch.
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        if deepspeed:  # the engine reduces and steps inside the backward of a window's end
            accelerator.gradient_state._set_sync_gradients(last)
        with sync:
            # Under mixed precision the whole loss (also a fused head + cross-entropy that calls
            # the backbone directly) runs in the autocast dtype, not only the model's forward.
            with accelerator.autocast():
                loss_sum, n = loss_fn(model, batch)
            if filler:
                loss_sum = loss_sum * 0.0
            else:
                returned_targets += n
            accelerator.backward(loss_sum * scale)
        loss_total += loss_sum.detach().to(torch.float64)
    if int(returned_targets) != sum(counts):
        raise ValueError(
            f"loss_fn reported {int(returned_targets)} targets for step {step}, but count_fn counted "
            f"{sum(counts)} from the labels; a custom loss_fn needs a count_fn that counts the same targets"
        )
    loss = float(accelerator.reduce(loss_total, "sum")) / max(window_targets, 1.0)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step, loss, last_checkpoint)

    clip = max_grad_norm if max_grad_norm else math.inf  # inf: measure the norm, do not clip
    grad_norm = float(gather_full(accelerator.clip_grad_norm_(trainable, clip)))  # FSDP2: a replicated DTensor
    if not math.isfinite(grad_norm) and accelerator.scaler is None and not deepspeed:
        # (fp16 loss scaling expects overflowing norms: the scaler skips that step by itself.)
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteGradError(step, grad_norm, loss, last_checkpoint)
    lr = optimizer.param_groups[0]["lr"]
    if not deepspeed and measures_update(step):
        before = _snapshot(trainable)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow step keeps the schedule in place
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    result = {
        "loss": loss,
        "loss_sum": loss * window_targets,
        "targets": window_targets,
        "tokens": int(window_tokens),
        "lr": lr,
        "grad_norm": grad_norm,
    }
    if before is not None:
        result["update_ratio"] = _update_ratio(before, trainable)
    return result


def measures_update(step: int) -> bool:
    """The steps whose update ratio is measured: the first 10 (a far too large lr or alpha shows
    at once) and every 50th after. Measuring copies every trainable weight before the step and
    reads it again after, which costs a visible share of a LoRA step if done on every one."""
    return step <= 10 or step % 50 == 0


def _snapshot(trainable: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [gather_full(p.detach()).clone() for p in trainable]


@torch.no_grad()
def _update_ratio(before: list[torch.Tensor], trainable: list[torch.nn.Parameter]) -> float:
    """||w_after - w_before|| / ||w_before|| over all trainable tensors (inf when all started at 0)."""
    moved = float(sum((gather_full(p.detach()).float() - b.float()).pow(2).sum() for p, b in zip(trainable, before)))
    size = float(sum(b.float().pow(2).sum() for b in before))
    if size == 0.0:
        return 0.0 if moved == 0.0 else math.inf
    return math.sqrt(moved / size)


def _real_tokens(batch: Batch) -> int:
    """Non-padding input tokens from a [B, T] 0/1 mask; all positions when the mask is absent
    or is a [B, 1, T, T] additive (packed) mask, which does not say which positions are padding."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int((mask != 0).sum())
    return batch["input_ids"].numel()


@torch.no_grad()
def evaluate(
    accelerator: Any,
    model: torch.nn.Module,
    eval_data: Rows,
    collate: CollateFn,
    task: str,
    micro_batch_size: int,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """Target-weighted eval loss over all rows (sharded over processes), with eval_perplexity
    for causal LMs and eval_accuracy for classification with the built-in loss (per row for
    seq-cls, per labelled token for token-cls)."""
    plan = DataPlan(len(eval_data), micro_batch_size, 1, accelerator.num_processes, 0, shuffle=False)
    order = plan.epoch_order(0)
    loss_fn = loss_fn or default_loss_fn(task)
    accuracy_fn = {"seq-cls": seq_cls_eval, "token-cls": token_cls_eval}.get(task)
    with_accuracy = accuracy_fn is not None and loss_fn is default_loss_fn(task)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, targets, correct
    was_training = model.training
    model.eval()
    try:
        for window in range(plan.steps_per_epoch):
            for indices in plan.micro_batches(order, window, accelerator.process_index):
                batch, filler = load_micro_batch(eval_data, indices, collate, accelerator.device)
                if with_accuracy:
                    loss_sum, n, correct = accuracy_fn(model, batch)
                else:
                    with accelerator.autocast():
                        (loss_sum, n), correct = loss_fn(model, batch), 0
                if not filler:
                    totals += torch.tensor([0.0, float(n), float(correct)], dtype=torch.float64, device=totals.device)
                    totals[0] += loss_sum.double()
    finally:
        model.train(was_training)
    loss_sum, targets, correct = accelerator.reduce(totals, "sum").tolist()
    loss = loss_sum / max(targets, 1.0)
    metrics = {"eval_loss": loss}
    if task == "causal-lm":
        metrics["eval_perplexity"] = perplexity(loss)
    if with_accuracy:
        metrics["eval_accuracy"] = correct / max(targets, 1.0)
    return metrics
