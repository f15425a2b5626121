"""Warnings that a run is diverging while its numbers are still finite.

A learning rate of 1e6 does not make the loss NaN: the first step throws the adapter so far
that the model saturates, the gradients vanish and the run "completes" with a destroyed
adapter. Two signs catch that early, each warned once per run (not once per step):
  - one step moved the trainable weights by more than UPDATE_RATIO_LIMIT times their size
    (||dW|| / ||W||; a healthy step moves them by a small fraction of it, lr 1e6 by 10^7 times);
  - the loss rose above LOSS_RISE_LIMIT times the run's first loss.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

UPDATE_RATIO_LIMIT = 10.0
LOSS_RISE_LIMIT = 2.0


class DivergenceWatch:
    """Watches each optimizer step's result (see step.optimizer_step) and warns once per sign."""

    def __init__(self) -> None:
        self.first_loss: float | None = None
        self.warned: set[str] = set()

    def check(self, step: int, result: Mapping[str, float]) -> None:
        loss, ratio, lr = result["loss"], result.get("update_ratio", 0.0), result["lr"]
        if self.first_loss is None and result.get("targets", 1.0) > 0:
            self.first_loss = loss
        if ratio > UPDATE_RATIO_LIMIT and "update" not in self.warned:
            self.warned.add("update")
            warnings.warn(
                f"step {step}: the update moved the trainable weights by {ratio:.3g} times their size "
                f"(||dW||/||W||, limit {UPDATE_RATIO_LIMIT:g}) at lr {lr:.3g}; training is likely diverging "
                "and the adapter being destroyed: lower the learning rate or lora_alpha",
                stacklevel=3)
        first = self.first_loss
        if (first is not None and first > 0 and math.isfinite(loss) and loss > LOSS_RISE_LIMIT * first
                and "loss" not in self.warned):
            self.warned.add("loss")
            warnings.warn(
                f"step {step}: loss {loss:.4g} is {loss / first:.3g} times the first step's {first:.4g} "
                f"(limit {LOSS_RISE_LIMIT}x); training is diverging: lower the learning rate (now {lr:.3g})",
                stacklevel=3)
