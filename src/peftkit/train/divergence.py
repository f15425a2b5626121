"""Warnings that a run is diverging while its numbers are still finite.

A learning rate of 1e6 does not make the loss NaN: the first step throws the adapter so far
that the model saturates, the gradients vanish and the run "completes" with a destroyed
adapter. Two signs catch that early, each warned once per run (not once per step):
  - one step moved the trainable weights by more than UPDATE_RATIO_LIMIT times their size
    (||dW|| / ||W||; a healthy step moves them by a small fraction of it, lr 1e6 by 10^7 times);
  - the mean loss of the last LOSS_WINDOW steps rose above LOSS_RISE_LIMIT times the mean of
    the run's first LOSS_WINDOW steps (means, not single steps: the loss of one small batch
    easily differs 2x from another's in a healthy run).
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Mapping

UPDATE_RATIO_LIMIT = 10.0
LOSS_RISE_LIMIT = 2.0
LOSS_WINDOW = 5


class DivergenceWatch:
    """Watches each optimizer step's result (see step.optimizer_step) and warns once per sign."""

    def __init__(self) -> None:
        self.first: list[float] = []  # the first LOSS_WINDOW losses (steps with targets)
        self.recent: deque[float] = deque(maxlen=LOSS_WINDOW)  # the last LOSS_WINDOW after those
        self.warned: set[str] = set()

    def check(self, step: int, result: Mapping[str, float]) -> None:
        loss, ratio, lr = result["loss"], result.get("update_ratio", 0.0), result["lr"]
        if ratio > UPDATE_RATIO_LIMIT and "update" not in self.warned:
            self.warned.add("update")
            warnings.warn(
                f"step {step}: the update moved the trainable weights by {ratio:.3g} times their size "
                f"(||dW||/||W||, limit {UPDATE_RATIO_LIMIT:g}) at lr {lr:.3g}; training is likely diverging "
                "and the adapter being destroyed: lower the learning rate or lora_alpha",
                stacklevel=3)
        if result.get("targets", 1.0) <= 0 or not math.isfinite(loss):
            return
        if len(self.first) < LOSS_WINDOW:
            self.first.append(loss)
            return
        self.recent.append(loss)
        start, now = sum(self.first) / LOSS_WINDOW, sum(self.recent) / LOSS_WINDOW
        if (len(self.recent) == LOSS_WINDOW and start > 0 and now > LOSS_RISE_LIMIT * start
                and "loss" not in self.warned):
            self.warned.add("loss")
            warnings.warn(
                f"step {step}: the mean loss of the last {LOSS_WINDOW} steps, {now:.4g}, is {now / start:.3g} times "
                f"that of the first {LOSS_WINDOW}, {start:.4g} (limit {LOSS_RISE_LIMIT}x); training is diverging: "
                f"lower the learning rate (now {lr:.3g})",
                stacklevel=3)
