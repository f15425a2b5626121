"""`train`: the training loop, top to bottom — set up, resume, step, log, eval, checkpoint, finish.

Accelerate supplies the device, mixed precision and (under `accelerate launch` / `torchrun`)
DDP, FSDP2 or DeepSpeed ZeRO 1/2 (see deepspeed_zero); the loop itself is plain PyTorch. One
optimizer step reads one window of `micro_batch_size * grad_accum * num_processes` rows (see
data.DataPlan) and normalises the loss by the window's target count (see step.optimizer_step).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from accelerate.utils import broadcast, set_seed

from ..fast_attention import disable_fast_attention, enable_fast_attention, fast_attention_enabled
from ..kernels.compile import compile_decoder_layers
from .checkpoint import check_against_run, describe_changes, load_checkpoint, read_state, save_checkpoint
from .divergence import DivergenceWatch
from .config import TrainConfig
from .data import Batch, CollateFn, DataPlan, data_fingerprint, make_collate
from .logging import RunLogger, peak_memory_mb, require_tensorboard
from .loss import LossFn, count_targets, default_loss_fn
from .optim import OptimizerFactory, build_optimizer
from .runtime import (
    any_process,
    check_data,
    enable_gradient_checkpointing,
    make_accelerator,
    mixed_precision_for,
    pad_token_id,
    prepare_output_dir,
    resolve_task,
)
from .run_lock import hold_output_dir
from .schedule import build_scheduler
from .signals import StopRequest
from .state import StepInfo, TrainResult, TrainState
from .step import evaluate, load_micro_batch, optimizer_step

Rows = Sequence[Mapping[str, Any]]
SummaryExtra = Callable[[Mapping[str, Any]], Mapping[str, Any]]


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
    accelerator: Any = None,
    eval_before: Mapping[str, float] | None = None,
    summary_extra: SummaryExtra | None = None,
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
    `accelerator`: one made by `runtime.make_accelerator(config)` that the caller also uses
    (default: made here). `eval_before`: metrics of the caller's eval before training, the
    step-0 record of metrics.jsonl. `summary_extra(summary)`: more summary.json keys, asked for
    as the run ends. The loop is the one writer of the run's files: the adapter (PEFT format),
    metrics.jsonl, summary.json and loss_curve.png in `config.output_dir`.
    """
    # -- checks that touch nothing ------------------------------------------------------
    config = (config or TrainConfig()).validate()
    check_data(train_data, eval_data, config)
    task = resolve_task(config.task, model)
    if config.tensorboard:
        require_tensorboard()

    # -- the phases of a run, in order --------------------------------------------------
    accelerator = _accelerator_for(config, accelerator)
    set_seed(config.seed, device_specific=True)  # each process its own dropout stream
    with hold_output_dir(config.output_dir, accelerator.is_main_process):  # one run per output folder
        run = _set_up(model, train_data, eval_data, config, task, accelerator, collate_fn, loss_fn, count_fn)
        with _set_for_training(model, config, accelerator):
            _build_optimizer(run, optimizer_fn)
            _resume(run)
            _open_logger(run, eval_before)
            with StopRequest() as stop:
                try:
                    _train_steps(run, stop, on_step_end)
                except BaseException:
                    run.logger.close()
                    raise
                _finish_steps(run)
            summary = _write_summary(run, summary_extra)
    return TrainResult(
        global_step=run.state.global_step,
        epoch=summary["epoch"],
        stopped_reason=run.stopped_reason,
        train_loss=run.train_loss,
        eval_metrics=run.state.last_eval,
        output_dir=run.out,
        last_checkpoint=run.last_checkpoint,
        summary=summary,
    )


@dataclass
class _Run:
    """What the phases of one `train` call share (each phase fills in or advances its part)."""

    model: torch.nn.Module
    train_data: Rows
    eval_data: Rows | None
    config: TrainConfig
    task: str
    accelerator: Any
    out: Path
    resume_path: Path | None
    plan: DataPlan
    total_steps: int
    collate: CollateFn
    loss_fn: LossFn
    eval_loss_fn: LossFn | None  # None: evaluate() uses the built-in loss and reports accuracy
    count_fn: Callable[[Batch], int]
    # set by _build_optimizer
    wrapped: torch.nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    main_pid: int = 0
    identity: dict[str, Any] = field(default_factory=dict)
    # advanced by _resume and _train_steps
    state: TrainState = field(default_factory=TrainState)
    logger: RunLogger | None = None
    session_start: float = 0.0
    session_tokens: int = 0
    stopped_reason: str = "completed"
    train_loss: float | None = None
    last_checkpoint: Path | None = None
    last_saved_step: int = 0
    last_eval_step: int | None = None
    divergence: DivergenceWatch = field(default_factory=DivergenceWatch)

    def epoch(self) -> float:
        return round(self.state.epoch_float(self.plan.steps_per_epoch), 4)


def _accelerator_for(config: TrainConfig, given: Any) -> Any:
    if given is None:
        return make_accelerator(config)
    wanted = mixed_precision_for(config.precision)
    if given.mixed_precision != wanted:
        raise ValueError(
            f"the accelerator passed to train() runs mixed_precision={given.mixed_precision!r}, but "
            f"precision={config.precision!r} asks for {wanted!r}; make it with runtime.make_accelerator(config)"
        )
    return given


def _set_up(model: torch.nn.Module, train_data: Rows, eval_data: Rows | None, config: TrainConfig, task: str,
            accelerator: Any, collate_fn: CollateFn | None, loss_fn: LossFn | None,
            count_fn: Callable[[Batch], int] | None) -> _Run:
    """The output folder (and the checkpoint to resume from), the row plan, collate and loss."""
    out = Path(config.output_dir)
    resume_path = prepare_output_dir(accelerator, out, config.resume_from)
    plan = DataPlan(len(train_data), config.micro_batch_size, config.grad_accum, accelerator.num_processes,
                    config.seed, config.shuffle)
    return _Run(
        model=model, train_data=train_data, eval_data=eval_data, config=config, task=task, accelerator=accelerator,
        out=out, resume_path=resume_path, plan=plan,
        total_steps=config.max_steps or config.epochs * plan.steps_per_epoch,
        collate=collate_fn or make_collate(pad_token_id(model), task), loss_fn=loss_fn or default_loss_fn(task),
        eval_loss_fn=loss_fn, count_fn=count_fn or functools.partial(count_targets, task=task),
        last_checkpoint=resume_path,
    )


@contextlib.contextmanager
def _set_for_training(model: torch.nn.Module, config: TrainConfig, accelerator: Any) -> Iterator[None]:
    """Gradient checkpointing, compiling and the attention kernel for this run; on the way out,
    whatever happens, the model comes back as it came (no autocast wrapper, same mode,
    checkpointing and attention as before). Compiled layers stay compiled."""
    was_training = model.training
    undo_checkpointing = enable_gradient_checkpointing(model) if config.gradient_checkpointing else None
    if config.compile:
        compile_decoder_layers(model)  # compiles on the first step
    routed_before = fast_attention_enabled(model)
    if config.fast_attention:
        enable_fast_attention(model)
    else:
        disable_fast_attention(model)
    try:
        model.train()
        yield
    finally:
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        model.train(was_training)
        if undo_checkpointing is not None:
            undo_checkpointing()
        if routed_before != config.fast_attention:
            (enable_fast_attention if routed_before else disable_fast_attention)(model)


def _build_optimizer(run: _Run, optimizer_fn: OptimizerFactory | None) -> None:
    """Optimizer and schedule, wrapped by Accelerate; what identifies this run in a checkpoint."""
    accelerator, model, config = run.accelerator, run.model, run.config
    optimizer = (optimizer_fn or build_optimizer)(model, config)
    run.scheduler = build_scheduler(optimizer, config, run.total_steps)
    run.wrapped, run.optimizer = accelerator.prepare(model, optimizer)
    run.trainable = [p for p in model.parameters() if p.requires_grad]
    # The main process's pid names the temporary checkpoint folder on every process.
    run.main_pid = int(broadcast(torch.tensor([os.getpid()], device=accelerator.device), from_process=0).item())
    run.identity = {"config": config.to_dict(), "config_fingerprint": config.fingerprint(),
                    "data_fingerprint": data_fingerprint(run.train_data), "num_rows": len(run.train_data)}


def _resume(run: _Run) -> None:
    """Weights, optimizer, schedule, scaler, RNG and position from the checkpoint, if resuming."""
    if run.resume_path is None:
        return
    accelerator = run.accelerator
    # Before loading: the optimizer still holds the rates this run's config gives.
    check_against_run(run.resume_path, read_state(run.resume_path), run.total_steps, run.optimizer,
                      run.identity["config"])
    saved = load_checkpoint(run.resume_path, accelerator, run.model, run.optimizer)
    run.scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved.get("scaler"):
        accelerator.scaler.load_state_dict(saved["scaler"])
    run.state = TrainState.from_dict(saved["progress"])
    run.last_saved_step = run.state.global_step
    changes = describe_changes(saved, run.identity["config"], run.identity["data_fingerprint"],
                               len(run.train_data), accelerator.num_processes)
    if changes:
        warnings.warn(f"resuming from {run.resume_path} with a different setup, so the run will not "
                      "match an uninterrupted one:\n  " + "\n  ".join(changes), stacklevel=3)


def _open_logger(run: _Run, eval_before: Mapping[str, float] | None) -> None:
    config, state = run.config, run.state
    run.logger = RunLogger(run.out, is_main=run.accelerator.is_main_process, total_steps=run.total_steps,
                           start_step=state.global_step, progress=config.progress, tensorboard=config.tensorboard,
                           resume_step=state.global_step if run.resume_path else None, eval_before=eval_before)
    if run.resume_path is not None:
        run.logger.message(f"resumed from {run.resume_path} at step {state.global_step}")
    elif config.resume_from == "latest":
        run.logger.message(f"resume_from='latest': no checkpoint in {run.out}, starting at step 0")
    run.session_start = time.perf_counter()


def _train_steps(run: _Run, stop: StopRequest, on_step_end: Callable[[StepInfo], bool | None] | None) -> None:
    """Optimizer steps until total_steps, a stop request, the callback or early stopping."""
    config, state, plan, accelerator = run.config, run.state, run.plan, run.accelerator
    interval = _Interval(run.session_start)
    order, order_epoch = plan.epoch_order(state.epoch), state.epoch
    while state.global_step < run.total_steps:
        if order_epoch != state.epoch:
            order, order_epoch = plan.epoch_order(state.epoch), state.epoch
        micro = [load_micro_batch(run.train_data, indices, run.collate, accelerator.device)
                 for indices in plan.micro_batches(order, state.step_in_epoch, accelerator.process_index)]
        result = optimizer_step(accelerator, run.wrapped, run.optimizer, run.scheduler, micro, run.loss_fn,
                                run.count_fn, run.trainable, config.max_grad_norm, state.global_step + 1,
                                run.last_checkpoint)
        state.advance(plan.steps_per_epoch)
        run.divergence.check(state.global_step, result)
        state.tokens_seen += result["tokens"]
        run.session_tokens += result["tokens"]
        run.logger.advance()
        interval.add(result)

        if state.global_step % config.log_every == 0 or state.global_step == run.total_steps:
            run.train_loss = interval.log(run, result)

        eval_metrics: dict[str, float] = {}
        if run.eval_data and config.eval_every and state.global_step % config.eval_every == 0:
            eval_metrics, run.last_eval_step = _evaluate(run), state.global_step
            patience = config.early_stopping_patience or math.inf
            if state.record_eval(eval_metrics["eval_loss"]) >= patience:
                run.stopped_reason = "early_stopping"

        asked = bool(on_step_end and on_step_end(StepInfo(
            state.global_step, state.epoch_float(plan.steps_per_epoch), result["loss"], result["lr"],
            result["grad_norm"], eval_metrics)))
        wants_stop = any_process(accelerator, stop.requested or asked)
        if wants_stop and run.stopped_reason == "completed":
            run.stopped_reason = "signal" if stop.requested else "callback"

        if wants_stop or (config.save_every and state.global_step % config.save_every == 0):
            run.last_checkpoint, run.last_saved_step = _checkpoint(run), state.global_step
        if run.stopped_reason != "completed":
            run.logger.message(f"stopping at step {state.global_step} ({run.stopped_reason})")
            return


class _Interval:
    """Loss, targets and tokens since the last train record (its loss and throughput)."""

    def __init__(self, start: float):
        self.loss_sum, self.targets, self.tokens, self.start = 0.0, 0.0, 0.0, start

    def add(self, result: Mapping[str, float]) -> None:
        self.loss_sum += result["loss_sum"]
        self.targets += result["targets"]
        self.tokens += result["tokens"]

    def log(self, run: _Run, result: Mapping[str, float]) -> float:
        """Write the train record of this step; start a new interval; return its loss."""
        now = time.perf_counter()
        loss = self.loss_sum / max(self.targets, 1.0)
        run.logger.log({
            "step": run.state.global_step,
            "epoch": run.epoch(),
            "loss": loss,
            "lr": result["lr"],
            "grad_norm": result["grad_norm"],
            "tokens_per_s": self.tokens / max(now - self.start, 1e-9),
            "elapsed_s": run.state.train_time_s + now - run.session_start,
        })
        self.__init__(now)
        return loss


def _evaluate(run: _Run) -> dict[str, float]:
    metrics = evaluate(run.accelerator, run.wrapped, run.eval_data, run.collate, run.task,
                       run.config.micro_batch_size, run.eval_loss_fn)
    run.logger.log({"step": run.state.global_step, "epoch": run.epoch(), **metrics})
    run.state.last_eval = metrics
    return metrics


def _checkpoint(run: _Run) -> Path:
    state, accelerator = run.state, run.accelerator
    progress = dict(state.to_dict(), train_time_s=state.train_time_s + time.perf_counter() - run.session_start)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    payload = {"global_step": state.global_step, "progress": progress, "sampler_seed": run.config.seed,
               "scheduler": run.scheduler.state_dict(), "scaler": scaler, **run.identity}
    return save_checkpoint(accelerator, run.model, run.optimizer, payload, run.out, run.config.keep_last,
                           run.main_pid)


def _finish_steps(run: _Run) -> None:
    """A completed run ends on an eval and a checkpoint of its last step; the adapter is saved."""
    if run.stopped_reason == "completed":
        if run.eval_data and run.last_eval_step != run.state.global_step:
            _evaluate(run)
        if run.config.save_every and run.last_saved_step != run.state.global_step:
            run.last_checkpoint = _checkpoint(run)
    run.model.save_pretrained(str(run.out), is_main_process=run.accelerator.is_main_process)  # collective under FSDP
    run.accelerator.wait_for_everyone()


def _write_summary(run: _Run, summary_extra: SummaryExtra | None) -> dict[str, Any]:
    """summary.json (with the caller's keys) and loss_curve.png; the summary is returned on every process."""
    state, accelerator = run.state, run.accelerator
    session_time = time.perf_counter() - run.session_start
    summary = {
        "global_step": state.global_step,
        "total_steps": run.total_steps,
        "epoch": run.epoch(),
        "stopped_reason": run.stopped_reason,
        "task": run.task,
        "train_time_s": round(state.train_time_s + session_time, 3),
        "session_time_s": round(session_time, 3),
        "tokens": state.tokens_seen,
        "tokens_per_s": run.session_tokens / max(session_time, 1e-9),
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "final_train_loss": run.train_loss,
        "final_eval": state.last_eval,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "trainable_params": sum(p.numel() for p in run.trainable),
        "resumed_from": str(run.resume_path) if run.resume_path else None,
        "last_checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
    }
    if summary_extra is not None:
        summary.update(summary_extra(summary))
    run.logger.finish(summary)
    return summary
