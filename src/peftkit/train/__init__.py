"""peftkit's own training loop (Accelerate underneath: one CPU, one GPU, or DDP)."""

from .checkpoint import CheckpointError, find_latest_checkpoint, list_checkpoints
from .config import TrainConfig, TrainConfigError
from .data import DataPlan, make_collate
from .loop import train
from .loss import causal_lm_loss, count_targets, seq_cls_loss, token_cls_loss
from .optim import build_optimizer
from .schedule import lr_factor
from .state import NonFiniteLossError, StepInfo, TrainResult
from .step import evaluate

__all__ = [
    "train",
    "evaluate",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "StepInfo",
    "NonFiniteLossError",
    "CheckpointError",
    "find_latest_checkpoint",
    "list_checkpoints",
    "make_collate",
    "DataPlan",
    "causal_lm_loss",
    "seq_cls_loss",
    "token_cls_loss",
    "count_targets",
    "build_optimizer",
    "lr_factor",
]
