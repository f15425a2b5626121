"""Peak memory of a training step, estimated before anything is allocated, and out-of-memory
errors told as such.

The estimate (`peftkit train --dry-run`) adds up, from the model's config on the meta device:
the weights in their dtype; the trainable parameters' gradient and AdamW moments (fp32); the
activations autograd saves for backward at the largest batch (rows x longest sequence), with
and without gradient checkpointing; and the loss's logits. Per token and layer a decoder layer
saves about 8.8 x hidden + 4 x intermediate values (+ heads x sequence with eager attention),
fitted on Llama layers with LoRA on every linear layer (measured with autograd's saved-tensor
hooks); during backward one more layer's worth is alive (two with checkpointing: the
recomputed layer and its gradients). benchmarks/memory_estimate.py compares the estimate with
the measured growth of the resident set over one step (benchmarks/README.md has the table);
tests/robustness/test_messages.py holds two shapes of it within 1.5x in both directions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

# Values saved per token and layer: SAVED_PER_HIDDEN x hidden + SAVED_PER_INTERMEDIATE x intermediate.
SAVED_PER_HIDDEN = 8.8
SAVED_PER_INTERMEDIATE = 4.0
# The fused loss (kernels.cross_entropy) works on chunks of about 32 MiB of fp32 logits, with a
# transient of ~2.5 chunks; an unfused loss holds the logits, their fp32 copy and the gradient.
LOSS_CHUNK_BYTES = 32 * 2**20
FUSED_LOSS_FACTOR = 2.5
UNFUSED_LOSS_FACTOR = 3.0
ADAM_BYTES_PER_TRAINABLE = 3 * 4  # fp32 gradient + two fp32 moments
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 2**30


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class ModelDims:
    """What the activation count needs from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    eager_attention: bool

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str, default: int | None = None) -> int:
            for name in names:
                value = getattr(text, name, None)
                if isinstance(value, int) and value > 0:
                    return value
            if default is None:
                raise ValueError(f"the model config has none of {names}; cannot estimate its memory")
            return default

        hidden = first("hidden_size", "d_model", "n_embd", "dim")
        layers = first("num_hidden_layers", "num_layers", "n_layer", "n_layers")
        layers += first("num_decoder_layers", default=0) if getattr(text, "is_encoder_decoder", False) else 0
        return cls(
            hidden=hidden,
            intermediate=first("intermediate_size", "d_ff", "ffn_dim", "n_inner", "encoder_ffn_dim", default=4 * hidden),
            layers=layers,
            heads=first("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads", default=1),
            vocab=first("vocab_size", default=0),
            eager_attention=getattr(text, "_attn_implementation", None) == "eager",
        )


@dataclass
class MemoryEstimate:
    """Bytes of one training step's peak, by part; `rows` x `seq_len` is the batch it assumes."""

    rows: int
    seq_len: int
    weights: int
    optimizer: int  # gradients + AdamW moments of the trainable parameters
    activations: int  # without gradient checkpointing
    activations_checkpointed: int
    loss: int
    gradient_checkpointing: bool
    capacity: int | None  # memory of the device the run would use, when known
    available: int | None
    device: str

    def peak(self, checkpointed: bool | None = None) -> int:
        checkpointed = self.gradient_checkpointing if checkpointed is None else checkpointed
        acts = self.activations_checkpointed if checkpointed else self.activations
        return self.weights + self.optimizer + acts + self.loss

    def lines(self) -> list[str]:
        on, off = self.peak(True), self.peak(False)
        other = f"{format_bytes(off)} without it" if self.gradient_checkpointing else f"{format_bytes(on)} with it"
        lines = [
            f"peak memory (estimate, largest batch {self.rows} x {self.seq_len} tokens): "
            f"{format_bytes(self.peak())}, gradient_checkpointing {'on' if self.gradient_checkpointing else 'off'} "
            f"({other})",
            f"  weights {format_bytes(self.weights)}, adapter gradients + AdamW state {format_bytes(self.optimizer)}, "
            f"activations {format_bytes(self.activations)} ({format_bytes(self.activations_checkpointed)} "
            f"checkpointed), loss {format_bytes(self.loss)}",
        ]
        if self.capacity is not None:
            free = f", {format_bytes(self.available)} available now" if self.available is not None else ""
            lines.append(f"  {self.device}: {format_bytes(self.capacity)}{free}")
        warning = self.warning()
        if warning:
            lines.append(f"warning: {warning}")
        return lines

    def warning(self) -> str | None:
        """Set when the step's peak does not fit the device: what to change, with the numbers."""
        if self.capacity is None or self.peak() <= self.capacity:
            return None
        hints = []
        if not self.gradient_checkpointing and self.peak(True) <= self.capacity:
            hints.append(f"train.gradient_checkpointing: true ({format_bytes(self.peak(True))})")
        variable = self.peak() - self.weights - self.optimizer
        fixed = self.weights + self.optimizer
        if fixed < self.capacity and self.rows > 1:
            share = (self.capacity - fixed) / max(variable, 1)
            rows = int(self.rows * share)
            if rows >= 1:
                hints.append(f"train.micro_batch_size {rows} or less")
            else:
                hints.append("a smaller train.micro_batch_size and data.max_length")
        elif fixed < self.capacity:
            hints.append("a smaller data.max_length")
        else:
            hints.append("a smaller model or dtype: the weights alone do not fit")
        return (f"the estimated peak {format_bytes(self.peak())} exceeds the {format_bytes(self.capacity)} of "
                f"{self.device} (batch {self.rows} x {self.seq_len} tokens); try " + " or ".join(hints))


def estimate_training_memory(
    model: torch.nn.Module, task: str, rows: int, seq_len: int, *, weight_bytes: int = 4, activation_bytes: int = 4,
    gradient_checkpointing: bool = False, fused_loss: bool | None = None,
) -> MemoryEstimate:
    """Peak bytes of one optimizer step of `model` (a peftkit model, real or on the meta device)
    on a batch of `rows` x `seq_len` tokens. `fused_loss`: the causal-LM loss runs in chunks
    (peftkit's default for causal-lm)."""
    dims = ModelDims.from_config(model.config)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = rows * seq_len
    per_token_layer = SAVED_PER_HIDDEN * dims.hidden + SAVED_PER_INTERMEDIATE * dims.intermediate
    # Eager attention saves its probabilities, and its backward holds two more score-sized
    # tensors (the gradients of the probabilities and of the scores) while it runs.
    scores = tokens * dims.heads * seq_len * activation_bytes if dims.eager_attention else 0
    layer = tokens * per_token_layer * activation_bytes + scores
    activations = int((dims.layers + 1) * layer + 2 * scores)
    checkpointed = int(dims.layers * tokens * dims.hidden * activation_bytes + 2 * layer + 2 * scores)
    fused = task == "causal-lm" if fused_loss is None else fused_loss
    if task in ("causal-lm", "seq2seq"):
        logits = tokens * dims.vocab * 4
        loss = FUSED_LOSS_FACTOR * min(logits, LOSS_CHUNK_BYTES) if fused else UNFUSED_LOSS_FACTOR * logits
    else:
        loss = 0
    capacity, available, device = device_memory()
    return MemoryEstimate(rows, seq_len, total * weight_bytes, trainable * ADAM_BYTES_PER_TRAINABLE, activations,
                          checkpointed, int(loss), gradient_checkpointing, capacity, available, device)


def device_memory() -> tuple[int | None, int | None, str]:
    """(total, available, name) of the memory a run would use: the GPU's on CUDA, else the
    machine's RAM (a container's cgroup limit when lower)."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return total, free, f"GPU ({torch.cuda.get_device_name()})"
    total = available = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = _cgroup_limit()
    if limit is not None and (total is None or limit < total):
        total = limit
        available = min(available, limit) if available is not None else None
    return total, available, "RAM"


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    return None


# --- out of memory ----------------------------------------------------------------------------

_CPU_ASKED = re.compile(r"tried to allocate (\d+) bytes", re.IGNORECASE)
_CUDA_ASKED = re.compile(r"tried to allocate ([\d.]+) (GiB|MiB|KiB|B)\b", re.IGNORECASE)
_OOM_TEXT = re.compile(r"can't allocate memory|out of memory|cannot allocate memory", re.IGNORECASE)
ADVICE = ("lower train.micro_batch_size or data.max_length, or set train.gradient_checkpointing: true "
          "(`peftkit train CONFIG --dry-run` estimates the peak memory)")


class RunOutOfMemory(MemoryError):
    """A run stopped by an allocation that did not fit; the message says how much, where, and
    which checkpoint is left."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc)))


def requested_bytes(exc: BaseException) -> int | None:
    """The size of the allocation that failed, when the allocator said it."""
    text = str(exc)
    match = _CPU_ASKED.search(text)
    if match:
        return int(match.group(1))
    match = _CUDA_ASKED.search(text)
    if match:
        scale = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "b": 1}[match.group(2).lower()]
        return int(float(match.group(1)) * scale)
    return None


def describe_out_of_memory(exc: BaseException, where: str | None = None, advice: str = ADVICE) -> str:
    """One line: out of memory, how much was asked, where, what the device has, what to try."""
    if isinstance(exc, RunOutOfMemory):
        return str(exc)
    asked = requested_bytes(exc)
    capacity, available, device = device_memory()
    parts = ["out of memory"]
    if where:
        parts.append(f" {where}")
    parts.append(f": an allocation of {format_bytes(asked)} failed" if asked else ": an allocation failed")
    if capacity is not None:
        parts.append(f" ({device}: {format_bytes(capacity)} in total"
                     + (f", {format_bytes(available)} available now)" if available is not None else ")"))
    parts.append(f"; {advice}")
    return "".join(parts)
