"""Plain records of a run: the counters a checkpoint restores, what a step reports, the result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; no update was applied for that step."""

    def __init__(self, step: int, loss: float, last_checkpoint: Path | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"loss is {loss} at optimizer step {step}; training stopped before applying that step, "
            f"{kept}. Common causes: too high a learning rate, fp16 overflow (try precision='bf16'), "
            "or a batch with bad labels"
        )


class NonFiniteGradError(RuntimeError):
    """The gradient norm became NaN or infinite while the loss was finite; no update was applied."""

    def __init__(self, step: int, grad_norm: float, loss: float, last_checkpoint: Path | None):
        self.step, self.grad_norm, self.loss, self.last_checkpoint = step, grad_norm, loss, last_checkpoint
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint was saved before it")
        super().__init__(
            f"gradient norm is {grad_norm} at optimizer step {step} (loss {loss:.6g}); training stopped before "
            f"applying that step, {kept}. Clipping cannot repair an infinite norm: look for an extreme scaling "
            "(e.g. lora_alpha / r far above 1e3) or learning rate, or try precision='fp32'"
        )


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint and restored on resume."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # windows of the current epoch already trained on
    tokens_seen: int = 0  # non-padding input tokens, all processes
    train_time_s: float = 0.0  # time spent in earlier sessions of this run
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)

    def advance(self, steps_per_epoch: int) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

    def record_eval(self, eval_loss: float) -> int:
        """Track the best eval loss; return how many evals in a row did not improve on it."""
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
            self.best_eval_loss, self.evals_without_improvement = eval_loss, 0
        else:
            self.evals_without_improvement += 1
        return self.evals_without_improvement

    def epoch_float(self, steps_per_epoch: int) -> float:
        return self.epoch + self.step_in_epoch / steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainState":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class StepInfo:
    """What `on_step_end` receives after each optimizer step (on every process)."""

    step: int  # optimizer steps done, 1-based
    epoch: float
    loss: float  # mean loss per target token (row for seq-cls) of this step's window
    lr: float
    grad_norm: float
    eval_metrics: dict[str, float]  # from an eval at this step, else empty


@dataclass
class TrainResult:
    """What `train` returns; `summary` is also written to output_dir/summary.json."""

    global_step: int
    epoch: float
    stopped_reason: str  # "completed" | "signal" | "callback" | "early_stopping"
    train_loss: float | None  # mean loss of the last log interval
    eval_metrics: dict[str, float]
    output_dir: Path
    last_checkpoint: Path | None
    summary: dict[str, Any]
