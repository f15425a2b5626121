"""Setting up a run: the Accelerator, the task, the data and output checks, gradient
checkpointing, the padding id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import deepspeed_zero
from .checkpoint import list_checkpoints, remove_stale_temporaries, resolve_resume_path
from .config import LOOP_TASKS, TrainConfig

Rows = Sequence[Mapping[str, Any]]


# Engines the loop cannot drive: its checkpoints and loss scaling know whole (DDP), DTensor-
# sharded (FSDP2) and ZeRO 1/2-partitioned optimizer state (see deepspeed_zero), not split layers.
_UNSUPPORTED_BACKENDS = {
    "MEGATRON_LM": "Megatron-LM splits layers over processes",
}


def mixed_precision_for(precision: str) -> str:
    """Accelerate's `mixed_precision` ("no" | "bf16" | "fp16") for a TrainConfig precision."""
    has_cuda = torch.cuda.is_available()
    if precision == "auto":
        from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # `accelerate launch --mixed_precision`
        if from_launcher in ("no", "bf16", "fp16"):
            return from_launcher
        if has_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if precision == "fp16" and not has_cuda:
        raise ValueError(
            "precision='fp16' needs a CUDA GPU (fp16 autocast with loss scaling); on CPU use 'bf16' or 'fp32'"
        )
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(config: TrainConfig) -> Any:
    """An Accelerator for this process; under `accelerate launch` / `torchrun` it joins the group."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = mixed_precision_for(config.precision)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed):
        # Accelerate keeps one process-wide state and refuses a second precision; a new run
        # in the same process (a notebook, a test session) may legitimately choose another.
        AcceleratorState._reset_state()
    # Without cpu=True Accelerate treats a CPU-only torchrun job as single-process.
    accelerator = Accelerator(mixed_precision=mixed, cpu=not _has_accelerator_device())
    backend = accelerator.distributed_type.name if hasattr(accelerator.distributed_type, "name") else str(
        accelerator.distributed_type
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"this process was launched as one of WORLD_SIZE={launched} processes, but Accelerate's state "
            f"has {accelerator.num_processes}: something created accelerate.PartialState() before training "
            "without cpu=True on a machine with no GPU; use peftkit.train.runtime.process_state() instead"
        )
    if backend in _UNSUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"peftkit.train runs on one device, DDP, FSDP2 or DeepSpeed ZeRO 1/2; got distributed type {backend} "
            f"({_UNSUPPORTED_BACKENDS[backend]}). Launch with one of those instead"
        )
    if backend == "DEEPSPEED":
        deepspeed_zero.configure(accelerator, config)
    if backend == "FSDP" and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise NotImplementedError(
            "peftkit.train supports FSDP version 2 only (per-parameter sharding keeps adapter and frozen "
            "weights apart); set fsdp_version: 2 in the accelerate config (or --fsdp_version 2)"
        )
    return accelerator


def process_state() -> Any:
    """Accelerate's PartialState (rank, world size) for this process, made as `make_accelerator`
    makes it: a CPU-only torchrun job must say cpu=True, or every process would run alone."""
    from accelerate import PartialState

    return PartialState(cpu=not _has_accelerator_device())


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def resolve_task(task: str, model: torch.nn.Module) -> str:
    """`task`, or for "auto" the task of the model's class (…ForCausalLM /
    …ForSequenceClassification / …ForTokenClassification), else of its PEFT task_type."""
    if task != "auto":
        return task
    from ..data.tasks import task_of_class_names, task_of_task_type  # lazy: peftkit.data loads datasets

    # The class comes first: its head is what the loss must fit. A class the loop has no loss
    # for (e.g. a vision-language …ForConditionalGeneration) defers to the task_type.
    name = type(base_model(model)).__name__
    configs = getattr(model, "peft_config", None)
    task_types = [getattr(c, "task_type", None) for c in configs.values()] if isinstance(configs, dict) else []
    for found in (task_of_class_names([name]), *map(task_of_task_type, task_types)):
        if found in LOOP_TASKS:
            return found
    raise ValueError(
        f"task='auto' cannot tell the task of a {name} (expected a ...ForCausalLM, ...ForSequenceClassification "
        "or ...ForTokenClassification model, or a PEFT task_type CAUSAL_LM / SEQ_CLS / TOKEN_CLS); "
        "set task to 'causal-lm', 'seq-cls' or 'token-cls'"
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> Callable[[], None]:
    """Recompute activations in backward (non-reentrant, so frozen inputs work with adapters).

    Returns a function that puts the model back as it was (checkpointing off again if it was off).
    """
    base = base_model(model)
    enable = getattr(base, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise ValueError(
            f"gradient_checkpointing=True, but {type(base).__name__} has no gradient_checkpointing_enable(); "
            "set gradient_checkpointing: false"
        )
    # transformers 5 renamed the flag and warns on the old name; read the old one only if needed.
    flag = "is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing") else "is_gradient_checkpointing"
    was_on = bool(getattr(base, flag, False))
    config = getattr(base, "config", None)
    use_cache = getattr(config, "use_cache", None)
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if callable(getattr(base, "enable_input_require_grads", None)):
        base.enable_input_require_grads()
    if use_cache:
        config.use_cache = False  # a KV cache is useless in training and clashes with recomputation

    def undo() -> None:
        if was_on:
            return
        base.gradient_checkpointing_disable()
        if callable(getattr(base, "disable_input_require_grads", None)):
            base.disable_input_require_grads()
        if use_cache:
            config.use_cache = use_cache

    return undo


def pad_token_id(model: torch.nn.Module) -> int:
    """The model's pad id, else its eos id, else 0 (padding is masked out either way)."""
    config = getattr(base_model(model), "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is True on at least one."""
    if accelerator.num_processes == 1:
        return flag
    # A signal may reach only some processes; all must stop (and checkpoint) together.
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def check_data(train_data: Rows, eval_data: Rows | None, config: TrainConfig) -> None:
    """Refuse data the loop cannot resume exactly in, and settings the data cannot serve."""
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None and not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise TypeError(
                f"{name} must be a datasets.Dataset or a sequence of dicts (len() and indexing give exact "
                f"resume positions); got {type(data).__name__}"
            )
    if len(train_data) == 0:
        raise ValueError("train_data is empty: nothing to train on")
    if config.early_stopping_patience is not None and not eval_data:
        raise ValueError(
            f"early_stopping_patience={config.early_stopping_patience} needs eval_data (early stopping "
            "watches the eval loss); pass eval_data or set early_stopping_patience to null"
        )


def prepare_output_dir(accelerator: Any, out: Path, resume_from: str | None) -> Path | None:
    """Create output_dir, clear dead temporaries; return the checkpoint to resume from, if any."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    accelerator.wait_for_everyone()
    if resume_from:
        return resolve_resume_path(resume_from, out)
    earlier = list_checkpoints(out)
    if earlier:
        # A fresh run would interleave its checkpoints with these, and keep_last prunes by step.
        raise ValueError(
            f"output_dir={str(out)!r} already holds checkpoints of an earlier run "
            f"({', '.join(path.name for _, path in earlier)}); set resume_from='latest' to continue it, "
            "or use another output_dir"
        )
    return None
