"""`train`: the training loop, top to bottom — set up, resume, step, log, eval, checkpoint, finish.

Accelerate supplies the device, mixed precision and (under `accelerate launch` / `torchrun`)
DDP, FSDP2 or DeepSpeed ZeRO 1/2 (see deepspeed_zero); the loop itself is plain PyTorch. One
optimizer step reads one window of `micro_batch_size * grad_accum * num_processes` rows (see
data.DataPlan) and normalises the loss by the window's target count (see step.optimizer_step).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from accelerate.utils import broadcast, set_seed

from ..fast_attention import disable_fast_attention, enable_fast_attention, fast_attention_enabled
from ..kernels.compile import compile_decoder_layers
from .checkpoint import (
    describe_changes,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume_path,
    save_checkpoint,
)
from .config import TrainConfig
from .data import Batch, CollateFn, DataPlan, data_fingerprint, make_collate
from .logging import RunLogger, peak_memory_mb, require_tensorboard
from .loss import LossFn, count_targets, default_loss_fn
from .optim import OptimizerFactory, build_optimizer
from .runtime import (
    any_process,
    enable_gradient_checkpointing,
    make_accelerator,
    pad_token_id,
    resolve_task,
)
from .schedule import build_scheduler
from .signals import StopRequest
from .state import StepInfo, TrainResult, TrainState
from .step import evaluate, load_micro_batch, optimizer_step

Rows = Sequence[Mapping[str, Any]]


def train(
    model: torch.nn.Module,
    train_data: Rows,
    eval_data: Rows | None = None,
    config: TrainConfig | None = None,
    collate_fn: CollateFn | None = None,
    *,
    loss_fn: LossFn | None = None,
    count_fn: Callable[[Batch], int] | None = None,
    optimizer_fn: OptimizerFactory | None = None,
    on_step_end: Callable[[StepInfo], bool | None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` (e.g. a peftkit LoRA model) in place.

    train_data / eval_data: a `datasets.Dataset` or a sequence of dicts with `input_ids`,
    optional `attention_mask` / `position_ids`, and `labels` (per token with -100 for a causal
    LM, one int class for sequence classification). `collate_fn(rows) -> batch` replaces the
    right-padding collate; `loss_fn(model, batch) -> (loss_sum, n_targets)` the built-in loss,
    with `count_fn(batch) -> n_targets` counting the same targets from the labels before any
    forward pass (default: the task's rule, `loss.count_targets`);
    `optimizer_fn(model, config)` the AdamW; `on_step_end(StepInfo)` runs after every optimizer
    step and may return True to stop (a checkpoint is saved, as on SIGINT/SIGTERM).
    Writes the adapter (PEFT format), metrics.jsonl, summary.json and loss_curve.png to
    `config.output_dir`.
    """
    # -- checks that touch nothing ------------------------------------------------------
    config = (config or TrainConfig()).validate()
    _check_data(train_data, eval_data, config)
    task = resolve_task(config.task, model)
    if config.tensorboard:
        require_tensorboard()

    accelerator = make_accelerator(config)
    set_seed(config.seed, device_specific=True)  # each process its own dropout stream
    out = Path(config.output_dir)
    resume_path = _prepare_output_dir(accelerator, out, config.resume_from)
    plan = DataPlan(len(train_data), config.micro_batch_size, config.grad_accum, accelerator.num_processes,
                    config.seed, config.shuffle)
    total_steps = config.max_steps or config.epochs * plan.steps_per_epoch
    collate = collate_fn or make_collate(pad_token_id(model), task)
    eval_loss_fn = loss_fn  # None: evaluate() uses the built-in loss and reports accuracy
    loss_fn = loss_fn or default_loss_fn(task)
    count_fn = count_fn or functools.partial(count_targets, task=task)

    # -- model, optimizer, schedule (undone on the way out, whatever happens) -----------
    was_training = model.training
    undo_checkpointing = enable_gradient_checkpointing(model) if config.gradient_checkpointing else None
    if config.compile:
        compile_decoder_layers(model)  # stays compiled after the run; compiles on the first step
    # The attention kernel for this run only: the model comes back computing as it came.
    routed_before = fast_attention_enabled(model)
    if config.fast_attention:
        enable_fast_attention(model)
    else:
        disable_fast_attention(model)
    try:
        model.train()
        optimizer = (optimizer_fn or build_optimizer)(model, config)
        scheduler = build_scheduler(optimizer, config, total_steps)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The main process's pid names the temporary checkpoint folder on every process.
        main_pid = int(broadcast(torch.tensor([os.getpid()], device=accelerator.device), from_process=0).item())
        run_identity = {"config": config.to_dict(), "config_fingerprint": config.fingerprint(),
                        "data_fingerprint": data_fingerprint(train_data), "num_rows": len(train_data)}

        # -- resume -----------------------------------------------------------------------
        state = TrainState()
        if resume_path is not None:
            saved = load_checkpoint(resume_path, accelerator, model, optimizer)
            scheduler.load_state_dict(saved["scheduler"])
            if accelerator.scaler is not None and saved.get("scaler"):
                accelerator.scaler.load_state_dict(saved["scaler"])
            state = TrainState.from_dict(saved["progress"])
            changes = describe_changes(saved, run_identity["config"], run_identity["data_fingerprint"],
                                       len(train_data), accelerator.num_processes)
            if changes:
                warnings.warn(f"resuming from {resume_path} with a different setup, so the run will not "
                              "match an uninterrupted one:\n  " + "\n  ".join(changes), stacklevel=2)
        logger = RunLogger(out, is_main=accelerator.is_main_process, total_steps=total_steps,
                           start_step=state.global_step, progress=config.progress, tensorboard=config.tensorboard,
                           resume_step=state.global_step if resume_path else None)
        if resume_path is not None:
            logger.message(f"resumed from {resume_path} at step {state.global_step}")
        elif config.resume_from == "latest":
            logger.message(f"resume_from='latest': no checkpoint in {out}, starting at step 0")

        session_start, session_tokens = time.perf_counter(), 0

        def checkpoint() -> Path:
            progress = dict(state.to_dict(), train_time_s=state.train_time_s + time.perf_counter() - session_start)
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            payload = {"global_step": state.global_step, "progress": progress, "sampler_seed": config.seed,
                       "scheduler": scheduler.state_dict(), "scaler": scaler, **run_identity}
            return save_checkpoint(accelerator, model, optimizer, payload, out, config.keep_last, main_pid)

        def run_eval() -> dict[str, float]:
            metrics = evaluate(accelerator, wrapped, eval_data, collate, task, config.micro_batch_size, eval_loss_fn)
            logger.log({"step": state.global_step, "epoch": round(state.epoch_float(plan.steps_per_epoch), 4),
                        **metrics})
            state.last_eval = metrics
            return metrics

        # -- the loop -----------------------------------------------------------------------
        stopped_reason = "completed"
        last_checkpoint, last_saved_step, last_eval_step = resume_path, state.global_step, None
        interval = {"loss_sum": 0.0, "targets": 0.0, "tokens": 0.0, "start": session_start}
        train_loss = None
        order, order_epoch = plan.epoch_order(state.epoch), state.epoch
        with StopRequest() as stop:
            try:
                while state.global_step < total_steps:
                    if order_epoch != state.epoch:
                        order, order_epoch = plan.epoch_order(state.epoch), state.epoch
                    micro = [load_micro_batch(train_data, indices, collate, accelerator.device)
                             for indices in plan.micro_batches(order, state.step_in_epoch, accelerator.process_index)]
                    result = optimizer_step(accelerator, wrapped, optimizer, scheduler, micro, loss_fn, count_fn,
                                            trainable, config.max_grad_norm, state.global_step + 1, last_checkpoint)
                    state.advance(plan.steps_per_epoch)
                    state.tokens_seen += result["tokens"]
                    session_tokens += result["tokens"]
                    logger.advance()
                    for key in ("loss_sum", "targets", "tokens"):
                        interval[key] += result[key]

                    if state.global_step % config.log_every == 0 or state.global_step == total_steps:
                        now = time.perf_counter()
                        train_loss = interval["loss_sum"] / max(interval["targets"], 1.0)
                        logger.log({
                            "step": state.global_step,
                            "epoch": round(state.epoch_float(plan.steps_per_epoch), 4),
                            "loss": train_loss,
                            "lr": result["lr"],
                            "grad_norm": result["grad_norm"],
                            "tokens_per_s": interval["tokens"] / max(now - interval["start"], 1e-9),
                            "elapsed_s": state.train_time_s + now - session_start,
                        })
                        interval = {"loss_sum": 0.0, "targets": 0.0, "tokens": 0.0, "start": now}

                    eval_metrics: dict[str, float] = {}
                    if eval_data and config.eval_every and state.global_step % config.eval_every == 0:
                        eval_metrics, last_eval_step = run_eval(), state.global_step
                        patience = config.early_stopping_patience or math.inf
                        if state.record_eval(eval_metrics["eval_loss"]) >= patience:
                            stopped_reason = "early_stopping"

                    asked = bool(on_step_end and on_step_end(StepInfo(
                        state.global_step, state.epoch_float(plan.steps_per_epoch), result["loss"], result["lr"],
                        result["grad_norm"], eval_metrics)))
                    wants_stop = any_process(accelerator, stop.requested or asked)
                    if wants_stop and stopped_reason == "completed":
                        stopped_reason = "signal" if stop.requested else "callback"

                    if wants_stop or (config.save_every and state.global_step % config.save_every == 0):
                        last_checkpoint, last_saved_step = checkpoint(), state.global_step
                    if stopped_reason != "completed":
                        logger.message(f"stopping at step {state.global_step} ({stopped_reason})")
                        break
            except BaseException:
                logger.close()
                raise

            # -- finish -------------------------------------------------------------------------
            if stopped_reason == "completed":
                if eval_data and last_eval_step != state.global_step:
                    run_eval()
                if config.save_every and last_saved_step != state.global_step:
                    last_checkpoint = checkpoint()
            model.save_pretrained(str(out), is_main_process=accelerator.is_main_process)  # collective under FSDP
            accelerator.wait_for_everyone()

        session_time = time.perf_counter() - session_start
        summary = {
            "global_step": state.global_step,
            "total_steps": total_steps,
            "epoch": round(state.epoch_float(plan.steps_per_epoch), 4),
            "stopped_reason": stopped_reason,
            "task": task,
            "train_time_s": round(state.train_time_s + session_time, 3),
            "session_time_s": round(session_time, 3),
            "tokens": state.tokens_seen,
            "tokens_per_s": session_tokens / max(session_time, 1e-9),
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "final_train_loss": train_loss,
            "final_eval": state.last_eval,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "trainable_params": sum(p.numel() for p in trainable),
            "resumed_from": str(resume_path) if resume_path else None,
            "last_checkpoint": str(last_checkpoint) if last_checkpoint else None,
        }
        logger.finish(summary)
    finally:
        # Hand the model back as it came: no autocast wrapper, same mode, checkpointing as before.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        model.train(was_training)
        if undo_checkpointing is not None:
            undo_checkpointing()
        if routed_before != config.fast_attention:
            (enable_fast_attention if routed_before else disable_fast_attention)(model)
    return TrainResult(
        global_step=state.global_step,
        epoch=summary["epoch"],
        stopped_reason=stopped_reason,
        train_loss=train_loss,
        eval_metrics=state.last_eval,
        output_dir=out,
        last_checkpoint=last_checkpoint,
        summary=summary,
    )


def _check_data(train_data: Rows, eval_data: Rows | None, config: TrainConfig) -> None:
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


def _prepare_output_dir(accelerator: Any, out: Path, resume_from: str | None) -> Path | None:
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
