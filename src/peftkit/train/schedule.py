"""Learning-rate schedule: linear warmup, then cosine / linear decay or a constant rate."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps, from `warmup_steps` or `warmup_ratio` of `total_steps`."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * total_steps)
    return 0


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step` of `total_steps`.

    Warmup ramps (step + 1) / warmup, so the first step already trains (unlike a ramp that
    starts at 0); decay then runs from 1 towards 0 and the last step still has a rate > 0
    for "linear", and cos(pi * (T-W-1)/(T-W)) for "cosine".
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"scheduler={kind!r}: expected one of 'cosine', 'linear', 'constant'")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (step counters) is plain JSON, so checkpoints need no pickle."""
    warmup = warmup_steps_for(config, total_steps)
    kind = config.scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, kind))
