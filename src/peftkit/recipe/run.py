"""`peftkit train`: a whole fine-tune from a run config, and its dry run.

A run: tokenizer -> data (prepare_datasets) -> model for the task -> adapter -> eval before
-> `peftkit.train.train` -> tokenizer, labels, run_config.yaml and the before/after metrics
written next to the adapter, so `generate`, `eval` and `merge` work on the folder offline.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..atomic_files import atomic_write_text
from ..data import PreparedData, prepare_datasets
from ..model import get_peft_model
from ..train import TrainConfig, TrainResult, train
from ..train.data import DataPlan
from ..train.run_lock import hold_output_dir
from ..train.runtime import make_accelerator, process_state
from .loading import RUN_CONFIG_FILE, adapter_config, load_model, load_tokenizer, meta_model, write_labels
from .memory import (DTYPE_BYTES, MemoryEstimate, RunOutOfMemory, describe_out_of_memory, estimate_training_memory,
                     is_out_of_memory)
from .quantization import base_memory
from .schema import RunConfig
from .seq2seq import seq2seq_collate, seq2seq_loss

Log = Callable[[str], None]
# The packed_attention mode (one of data.collate.PACKED_ATTENTION_MODES) that runs and evals
# use: packed rows are kept apart by their position_ids (each row restarts at 0), which
# transformers turns into block-diagonal attention when no cache is used; the loop always calls
# the model with use_cache=False. This keeps attention memory O(seq) instead of a 4D [B, 1, L, L] mask.
RUN_PACKED_ATTENTION = "position_ids"


@dataclass
class TaskHooks:
    """How the loop trains this task: its TrainConfig (with a concrete task), collate and loss."""

    train_config: TrainConfig
    collate: Callable
    loss_fn: Callable | None


def task_hooks(config: RunConfig, data: PreparedData) -> TaskHooks:
    if config.task == "seq2seq":
        return TaskHooks(dataclasses.replace(config.train, task="causal-lm"), seq2seq_collate(data.collator),
                         seq2seq_loss)
    return TaskHooks(dataclasses.replace(config.train, task=config.task), data.collator, None)


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    task: str
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    train: TrainResult
    wall_time_s: float
    cpu_time_s: float
    is_main_process: bool = True
    resume_command: str | None = None  # the command line that continues this run, when it stopped early

    def text(self) -> str:
        lines = [f"done in {self.wall_time_s:.0f} s (CPU time {self.cpu_time_s:.0f} s), "
                 f"{self.train.global_step} optimizer steps ({self.train.stopped_reason})"]
        if self.train.stopped_reason in ("signal", "callback") and self.train.last_checkpoint:
            how = f": {self.resume_command}" if self.resume_command else " with train.resume_from=latest"
            lines.append(f"stopped early; checkpoint {self.train.last_checkpoint} saved; resume{how}")
        if self.eval_after:
            lines.append(f"eval: {metrics_change(self.eval_before, self.eval_after)}")
        files = [name for name in ("adapter_model.safetensors", "metrics.jsonl", "loss_curve.png", "summary.json",
                                   RUN_CONFIG_FILE) if (self.output_dir / name).exists()]
        lines.append(f"output: {self.output_dir}/ ({', '.join(files)})")
        return "\n".join(lines)


def run_training(config: RunConfig, *, eval_before: bool = True, log: Log = print) -> RunResult:
    """Train the adapter described by `config`; return the metrics before and after.

    One Accelerator serves the whole run (the eval before, the loop, "am I the main process"),
    and the loop writes the run's files, this run's eval before and summary keys included.
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    accelerator = make_accelerator(config.train)
    # Owned before anything is loaded: a second run into this folder fails at once, not after
    # loading its model, and this run's tokenizer and run_config.yaml are written under the lock.
    if not accelerator.is_main_process:  # under torchrun every rank runs this; rank 0 speaks
        def log(_: str) -> None:
            return None
    tracker = _StepTracker()
    with hold_output_dir(config.train.output_dir, accelerator.is_main_process):
        try:
            return _run_training(config, accelerator, tracker, eval_before, log, wall0, cpu0)
        except Exception as exc:
            if not is_out_of_memory(exc) or isinstance(exc, RunOutOfMemory):
                raise
            raise RunOutOfMemory(tracker.out_of_memory_message(exc, config)) from exc


class _StepTracker:
    """Where a run is (phase, last finished step, last batch shape), for an out-of-memory message."""

    def __init__(self) -> None:
        self.phase, self.step, self.shape = "loading", 0, None

    def collate(self, collate: Callable) -> Callable:
        def tracked(rows: Any) -> Any:
            batch = collate(rows)
            ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            self.shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else self.shape
            return batch

        return tracked

    def on_step_end(self, info: Any) -> None:
        self.phase, self.step = "training", info.step

    def out_of_memory_message(self, exc: BaseException, config: RunConfig) -> str:
        from ..train.checkpoint import find_latest_checkpoint

        where = {"loading": "while loading the model",
                 "eval": "in the eval before training",
                 "training": f"at optimizer step {self.step + 1}"}[self.phase]
        if self.shape is not None:
            where += f" (batch of {' x '.join(str(d) for d in self.shape)} tokens)"
        latest = find_latest_checkpoint(config.train.output_dir)
        kept = (f"; the last checkpoint, {latest}, is intact (resume with train.resume_from=latest)" if latest
                else "; no checkpoint was written")
        return describe_out_of_memory(exc, where) + kept


def _run_training(config: RunConfig, accelerator: Any, tracker: _StepTracker, eval_before: bool, log: Log,
                  wall0: float, cpu0: float) -> RunResult:
    from accelerate.utils import set_seed

    tokenizer = load_tokenizer(config.model)
    # Under torchrun / accelerate launch, rank 0 tokenizes and fills the cache first; the
    # others then read it instead of writing the same cache files at the same time.
    with accelerator.main_process_first():
        data = prepare_datasets(config.data, tokenizer, config.task, packed_attention=RUN_PACKED_ATTENTION)
    log(data.summary())
    _check_trained_tokens(data)
    set_seed(config.train.seed)  # the initial adapter (and a new classifier head) depend on it
    model = get_peft_model(load_model(config.model, data.label_names), adapter_config(config))
    trainable, total = model.get_nb_trainable_parameters()
    log(f"model: {config.model.path} ({config.task}), {config.method} adapter: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    hooks = task_hooks(config, data)
    hooks = dataclasses.replace(hooks, collate=tracker.collate(hooks.collate))

    before = None
    if eval_before and data.eval is not None:
        tracker.phase = "eval"
        before = evaluate_prepared(model, data.eval, hooks, accelerator)
        log(f"eval before training: {format_metrics(before)}")
    times: dict[str, float] = {}

    def summary_extra(summary: Mapping[str, Any]) -> dict[str, Any]:
        times.update(wall=time.perf_counter() - wall0, cpu=time.process_time() - cpu0)
        return {
            "eval_before": before, "eval_after": summary["final_eval"] or None,
            "run_wall_time_s": round(times["wall"], 2), "run_cpu_time_s": round(times["cpu"], 2),
            "data_format": data.format,
            "data": {"train": data.stats.as_dict(), "eval": data.eval_stats.as_dict() if data.eval_stats else None},
            "adapter": {"method": config.method, "trainable_params": trainable, "total_params": total},
        }

    tracker.phase = "training"
    result = train(model, data.train, data.eval, hooks.train_config, hooks.collate, loss_fn=hooks.loss_fn,
                   accelerator=accelerator, eval_before=before, summary_extra=summary_extra,
                   on_step_end=tracker.on_step_end)
    out = Path(result.output_dir)
    if accelerator.is_main_process:  # what `generate`, `eval` and `merge` read beside the adapter
        tokenizer.save_pretrained(str(out))
        if data.label_names is not None:
            write_labels(str(out), data.label_names)
        atomic_write_text(str(out / RUN_CONFIG_FILE), config.to_yaml())
    return RunResult(out, config.task, before, result.eval_metrics or None, result, times["wall"], times["cpu"],
                     is_main_process=accelerator.is_main_process)


def _check_trained_tokens(data: PreparedData) -> None:
    """A run whose rows have no trained (causal-LM, seq2seq) or tagged (token-cls) token would take
    steps that change nothing."""
    from ..data import DataError

    if data.task != "seq-cls" and data.stats.trained_tokens == 0:
        if data.task == "token-cls":
            raise DataError(
                f"none of the {data.stats.examples} training rows has a tagged token, so training would change "
                f"nothing; data.max_length={data.max_length} leaves room for the special tokens only: raise it"
            )
        raise DataError(
            f"none of the {data.stats.examples} training rows has a trained token, so training would change "
            f"nothing; usually prompts longer than data.max_length={data.max_length} are cut before their "
            "completion: raise data.max_length (or use data.overflow: drop), and check data.train_on. "
            "`peftkit preview CONFIG` shows the rows with the trained tokens marked"
        )


def evaluate_prepared(model: torch.nn.Module, rows: Any, hooks: TaskHooks, accelerator: Any = None) -> dict[str, float]:
    """The loop's own eval (same batching, loss and accuracy) on `rows`, outside a training run;
    `accelerator`: the run's, else one made for this eval."""
    from ..train import evaluate

    accelerator = accelerator or make_accelerator(hooks.train_config)
    model.to(accelerator.device)
    was_training = model.training
    try:
        with accelerator.autocast():
            return evaluate(accelerator, model, rows, hooks.collate, hooks.train_config.task,
                            hooks.train_config.micro_batch_size, hooks.loss_fn)
    finally:
        model.train(was_training)


def format_metrics(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "n/a"
    parts = []
    if "eval_accuracy" in metrics:
        parts.append(f"accuracy {100 * metrics['eval_accuracy']:.1f}%")
    parts.append(f"loss {metrics['eval_loss']:.4f}")
    if metrics.get("eval_perplexity") is not None:
        parts.append(f"perplexity {metrics['eval_perplexity']:.2f}")
    return ", ".join(parts)


def metrics_change(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """`accuracy 15.2% -> 90.9%, loss 1.79 -> 0.26` (just `after` when there is no before)."""
    if not before:
        return format_metrics(after)
    parts = []
    if "eval_accuracy" in after and "eval_accuracy" in before:
        parts.append(f"accuracy {100 * before['eval_accuracy']:.1f}% -> {100 * after['eval_accuracy']:.1f}%")
    parts.append(f"loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
    if before.get("eval_perplexity") is not None and after.get("eval_perplexity") is not None:
        parts.append(f"perplexity {before['eval_perplexity']:.2f} -> {after['eval_perplexity']:.2f}")
    return ", ".join(parts)


# --- dry run ---------------------------------------------------------------------------------


@dataclass
class DryRunReport:
    """The resolved config and the numbers a run would have, computed without loading weights."""

    config: RunConfig
    data: PreparedData
    num_processes: int
    rows_per_step: int
    steps_per_epoch: int
    total_steps: int
    mean_tokens_per_step: float
    max_tokens_per_step: int
    trainable_params: int
    total_params: int
    adapted_modules: int
    memory: MemoryEstimate | None = None
    base_weight_bytes: tuple[int, int] | None = None  # (unquantized, quantized) with model.quantization

    def text(self) -> str:
        t = self.config.train
        lines = ["# resolved config", self.config.to_yaml().rstrip(), "", "# derived (no weights loaded)",
                 self.data.summary()]
        # A packed dataset row is a sequence of several examples; a step consumes those sequences.
        unit = "packed sequences" if self.data.packed else "rows"
        lines.append(f"{unit} per step: {self.rows_per_step} (micro_batch_size {t.micro_batch_size} x grad_accum "
                     f"{t.grad_accum} x {self.num_processes} process{'es' if self.num_processes != 1 else ''})")
        lines.append(f"tokens per step: {self.mean_tokens_per_step:,.0f} on average (padding excluded), "
                     f"at most {self.max_tokens_per_step:,}")
        if self.config.task == "seq-cls":  # a classifier trains on one label per row, not on tokens
            lines.append(f"trained per step: {self.rows_per_step} labels (one class per row)")
        elif self.config.task == "token-cls":
            per_row = self.data.stats.trained_tokens / max(self.data.stats.sequences, 1)
            lines.append(f"trained per step: {per_row * self.rows_per_step:,.0f} tagged tokens on average")
        how = f"max_steps {t.max_steps}" if t.max_steps else f"{t.epochs} epoch{'s' if t.epochs != 1 else ''}"
        lines.append(f"steps: {self.steps_per_epoch} per epoch, {self.total_steps} in total ({how})")
        share = 100 * self.trainable_params / max(self.total_params, 1)
        lines.append(f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} ({share:.2f}%), "
                     f"{self.config.method} on {self.adapted_modules} modules")
        if self.base_weight_bytes is not None:
            plain, quantized = self.base_weight_bytes
            q = self.config.model.quantization_config
            kind = f"{q.bits}-bit" + (f" {q.type}" if q.bits == 4 else "") + f", {q.backend}"
            lines.append(f"base weights: {quantized / 2**20:,.0f} MiB quantized ({kind}) instead of "
                         f"{plain / 2**20:,.0f} MiB ({quantized / max(plain, 1):.2f}x)")
        if self.memory is not None:
            lines += self.memory.lines()
        return "\n".join(lines)


def dry_run(config: RunConfig) -> DryRunReport:
    """Tokenize the data (cached) and count everything a run would do; reads no model weights."""
    from ..methods.base import AdapterLayer, ModulesToSaveWrapper

    tokenizer = load_tokenizer(config.model)
    data = prepare_datasets(config.data, tokenizer, config.task)
    world = process_state().num_processes  # Accelerate's answer, as in a run (no Accelerator: no weights here)
    t = config.train
    plan = DataPlan(len(data.train), t.micro_batch_size, t.grad_accum, world, t.seed, t.shuffle)
    total_steps = t.max_steps or t.epochs * plan.steps_per_epoch
    mean_len = data.stats.total_tokens / max(data.stats.sequences, 1)

    adapter = adapter_config(config)
    if getattr(adapter, "init_lora_weights", True) not in (True, False, "gaussian"):
        adapter.init_lora_weights = True  # SVD-based inits cannot run on meta tensors; counts are the same
    base = meta_model(config.model, data.label_names)
    quantization = config.model.quantization_config
    base_weight_bytes = None if quantization is None else base_memory(
        base, quantization, DTYPE_BYTES[_loaded_dtype(config, base)])
    with torch.device("meta"):  # adapter tensors too: moving CPU tensors into meta parameters fails
        model = get_peft_model(base, adapter)
    trainable, total = model.get_nb_trainable_parameters()
    adapted = sum(1 for m in model.modules() if isinstance(m, AdapterLayer) and not isinstance(m, ModulesToSaveWrapper))
    return DryRunReport(
        config=config, data=data, num_processes=world, rows_per_step=plan.window_size,
        steps_per_epoch=plan.steps_per_epoch, total_steps=total_steps,
        mean_tokens_per_step=mean_len * plan.window_size, max_tokens_per_step=plan.window_size * config.data.max_length,
        trainable_params=trainable, total_params=total, adapted_modules=adapted,
        memory=_memory_estimate(config, model, data, base_weight_bytes), base_weight_bytes=base_weight_bytes,
    )


def _memory_estimate(config: RunConfig, model: torch.nn.Module, data: PreparedData,
                     base_weight_bytes: tuple[int, int] | None = None) -> MemoryEstimate:
    """The peak of one step at the largest micro batch: micro_batch_size rows (at most the
    data's) padded to the longest sequence of the training data. `base_weight_bytes`: the
    quantized base's (unquantized, quantized) sizes; its adapter is counted in fp32."""
    rows = max(1, min(config.train.micro_batch_size, len(data.train)))
    seq_len = max(1, longest_sequence(data.train))
    on_gpu = torch.cuda.is_available()
    weight_bytes = DTYPE_BYTES[_loaded_dtype(config, model)]
    precision = config.train.precision
    mixed = precision in ("bf16", "fp16") or (precision == "auto" and on_gpu)
    estimate = estimate_training_memory(model, config.task, rows, seq_len, weight_bytes=weight_bytes,
                                        activation_bytes=2 if mixed else weight_bytes,
                                        gradient_checkpointing=bool(config.train.gradient_checkpointing))
    if base_weight_bytes is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        estimate.weights = base_weight_bytes[1] + trainable * 4
    return estimate


def _loaded_dtype(config: RunConfig, model: torch.nn.Module) -> str:
    """model.dtype as loading resolves it: auto is fp32 on CPU, the checkpoint's dtype on a GPU."""
    if config.model.dtype != "auto":
        return config.model.dtype
    if not torch.cuda.is_available():
        return "fp32"
    saved = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(saved, "fp32")


def longest_sequence(rows: Any) -> int:
    """The most input tokens of any row (a packed row: its whole sequence)."""
    if hasattr(rows, "with_format"):  # a datasets.Dataset: read the lengths without decoding the rows
        import pyarrow.compute as pc

        table = rows.with_format("arrow")[:]
        lengths = pc.list_value_length(table.column("input_ids"))
        longest = pc.max(lengths).as_py()
        return int(longest or 0)
    return max((len(row["input_ids"]) for row in rows), default=0)


# --- entry points of the command line ----------------------------------------------------------


def train_from_file(path: str | None, overrides: list[str] = (), *, dry: bool = False, eval_before: bool = True,
                    log: Log = print) -> RunResult | DryRunReport:
    """`peftkit train [CONFIG] [overrides]`: the run (or its dry run); no CONFIG runs the quickstart."""
    from .quickstart import quickstart_config, share_cpu_fairly
    from .schema import load_run_config

    config = quickstart_config(overrides) if path is None else load_run_config(path, overrides)
    if dry:
        return dry_run(config)
    if path is None:
        threads = share_cpu_fairly()  # the demo must stay quick on a shared machine
        if threads is not None:
            log(f"quickstart: {threads} CPU thread{'s' if threads != 1 else ''} (idle cores; set OMP_NUM_THREADS "
                "to choose)")
    result = run_training(config, eval_before=eval_before, log=log)
    result.resume_command = resume_command(path, overrides)
    return result


def resume_command(path: str | None, overrides: list[str] = ()) -> str:
    """The `peftkit train` command line that continues a run from its latest checkpoint."""
    import shlex

    kept = [item for item in overrides if not item.split("=", 1)[0].strip() in ("train.resume_from",)]
    head = ["peftkit", "train"] + (["--quickstart"] if path is None else [path])
    return shlex.join(head + kept + ["train.resume_from=latest"])


def preview_file(path: str, overrides: list[str] = (), n: int = 3, split: str = "train",
                 style: str = "brackets") -> Any:
    """`peftkit preview`: render `n` tokenized examples of a run config's data and check them."""
    from ..data import preview
    from .schema import load_run_config

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"-n {n!r}: expected an integer >= 1 (examples to show)")
    config = load_run_config(path, overrides)
    tokenizer = load_tokenizer(config.model)
    data = prepare_datasets(config.data, tokenizer, config.task)
    return preview(data, tokenizer, n=n, split=split, collator=data.collator, style=style)
