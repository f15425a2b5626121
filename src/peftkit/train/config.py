"""`TrainConfig`: every knob of the built-in training loop, validated as a whole.

Field names are the YAML keys under `train:`; `TrainConfig.from_dict` builds one from such a
mapping (unknown keys and wrong types are reported together with the accepted ones).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

# The tasks the loop has a loss for (names from data.tasks.TASKS; seq2seq trains through the
# recipe's own collate and loss); "auto" reads the task off the model.
LOOP_TASKS = ("causal-lm", "seq-cls", "token-cls")
TASKS = ("auto", *LOOP_TASKS)
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# adamw: torch's; the others bitsandbytes' (8-bit moments; paged: moments in memory the GPU pages
# to the host under pressure; on CPU bitsandbytes runs them unpaged).
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw")

# Fields that may differ between a run and its resumption without changing what is trained.
RESUME_NEUTRAL_FIELDS = frozenset({"resume_from", "progress", "tensorboard", "log_every", "output_dir", "compile",
                                   "fast_attention"})


class TrainConfigError(ValueError):
    """A `TrainConfig` with one or more invalid values; `problems` lists each of them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            f"invalid training config ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  - "
            + "\n  - ".join(problems)
        )


@dataclass
class TrainConfig:
    """Settings of `peftkit.train.train`. Steps count optimizer steps, not micro-batches.

    One optimizer step consumes `micro_batch_size * grad_accum * num_processes` rows.
    """

    output_dir: str = "out"
    task: str = "auto"  # "causal-lm" | "seq-cls" | "token-cls" | "auto" (from the model class)
    epochs: int = 1
    max_steps: int | None = None  # when set, wins over `epochs`
    micro_batch_size: int = 4  # rows per forward pass, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # give at most one of warmup_steps / warmup_ratio
    warmup_ratio: float | None = None  # fraction of all optimizer steps, in [0, 1)
    scheduler: str = "cosine"
    precision: str = "auto"  # auto: bf16 (or fp16) on a GPU, fp32 on CPU
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    gradient_checkpointing: bool = False
    shuffle: bool = True
    eval_every: int = 0  # optimizer steps between evals; 0: only at the end
    save_every: int = 500  # optimizer steps between checkpoints; 0: none except on a stop signal
    keep_last: int | None = 3  # checkpoints kept; None keeps all
    seed: int = 42
    log_every: int = 10
    early_stopping_patience: int | None = None  # evals without a lower eval loss before stopping
    tensorboard: bool = False
    progress: bool = True
    resume_from: str | None = None  # "latest", a checkpoint folder, or None
    lora_plus_ratio: float | None = None  # LoRA+: B matrices learn at lr * ratio (e.g. 16)
    optimizer: str = "adamw"  # one of OPTIMIZERS
    compile: bool = False  # torch.compile each decoder layer (faster steps after a compile warm-up)
    # peftkit's attention kernel for the run's SDPA attention (peftkit.enable_fast_attention;
    # where it applies: CPU, bf16/fp16, train mode); the model gets its own attention back after.
    fast_attention: bool = True

    # ---- validation -------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every invalid value, each naming the field, the value and what is accepted."""
        out = self._type_problems()
        # A wrongly typed value is reported once, by its type; its range check is skipped.
        skip = {p.split("=", 1)[0] for p in out}
        for name, check, accepted in _RANGE_CHECKS:
            if name not in skip and not check(getattr(self, name)):
                out.append(f"{name}={getattr(self, name)!r}: expected {accepted}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            out.append(
                f"warmup_steps={self.warmup_steps!r} and warmup_ratio={self.warmup_ratio!r}: "
                "expected at most one of them to be set"
            )
        return out

    def validate(self) -> "TrainConfig":
        """Raise `TrainConfigError` listing every invalid value; return self when all are valid."""
        found = self.problems()
        if found:
            raise TrainConfigError(found)
        return self

    def _type_problems(self) -> list[str]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            kind, optional = _FIELD_TYPES[f.name]
            if value is None and optional:
                continue
            ok = _is_kind(value, kind)
            if not ok:
                accepted = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[kind]
                out.append(f"{f.name}={value!r}: expected {accepted}{' or null' if optional else ''}")
        return out

    # ---- (de)serialisation ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build and validate a config from a YAML-style mapping.

        Numbers written as strings (YAML 1.1 reads `2e-4` as a string) are converted.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        problems = [
            f"unknown key {k!r}: accepted keys are {', '.join(sorted(known))}" for k in unknown
        ]
        kwargs = {k: _coerce(k, v) for k, v in values.items() if k in known}
        config = cls(**kwargs)
        problems += config.problems()
        if problems:
            raise TrainConfigError(problems)
        return config

    def fingerprint(self) -> str:
        """Hash of the fields that decide what is trained (not where or how it is shown)."""
        return config_fingerprint(self.to_dict())


def _number(lo: float, hi: float = math.inf, *, lo_open: bool = False, optional: bool = False):
    def check(v: Any) -> bool:
        if v is None:
            return optional
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi

    return check


def _one_of(choices: tuple[str, ...]):
    return lambda v: v in choices


def _choices(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(map(repr, choices))


# (field, check, what is accepted): checked only when the field has the right type.
_RANGE_CHECKS = [
    ("output_dir", bool, "a non-empty folder path"),
    ("task", _one_of(TASKS), _choices(TASKS)),
    ("epochs", _number(1), "an integer >= 1"),
    ("max_steps", _number(1, optional=True), "an integer >= 1 or null"),
    ("micro_batch_size", _number(1), "an integer >= 1"),
    ("grad_accum", _number(1), "an integer >= 1"),
    ("lr", _number(0, lo_open=True), "a finite number > 0"),
    ("weight_decay", _number(0), "a finite number >= 0"),
    ("warmup_steps", _number(0, optional=True), "an integer >= 0 or null"),
    ("warmup_ratio", lambda v: v is None or 0 <= v < 1, "a number in [0, 1) or null"),
    ("scheduler", _one_of(SCHEDULERS), _choices(SCHEDULERS)),
    ("precision", _one_of(PRECISIONS), _choices(PRECISIONS)),
    ("max_grad_norm", _number(0, optional=True), "a finite number >= 0 or null"),
    ("eval_every", _number(0), "an integer >= 0 (0: eval only at the end)"),
    ("save_every", _number(0), "an integer >= 0 (0: no periodic checkpoints)"),
    ("keep_last", _number(1, optional=True), "an integer >= 1 or null (keep all)"),
    ("seed", _number(0), "an integer >= 0"),
    ("log_every", _number(1), "an integer >= 1"),
    ("early_stopping_patience", _number(1, optional=True), "an integer >= 1 or null"),
    ("resume_from", lambda v: v is None or bool(v), "'latest', a checkpoint folder path, or null"),
    ("lora_plus_ratio", _number(0, lo_open=True, optional=True), "a number > 0 or null"),
    ("optimizer", _one_of(OPTIMIZERS), _choices(OPTIMIZERS)),
]


def config_fingerprint(values: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in values.items() if k not in RESUME_NEUTRAL_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`name: old -> new` for each training-relevant field that differs."""
    names = sorted((set(old) | set(new)) - RESUME_NEUTRAL_FIELDS)
    return [f"{n}: {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n)]


def _field_types() -> dict[str, tuple[type, bool]]:
    table = {}
    for f in fields(TrainConfig):
        annotation = str(f.type).replace(" ", "")
        optional = annotation.endswith("|None")
        base = annotation.removesuffix("|None")
        table[f.name] = ({"bool": bool, "int": int, "float": float, "str": str}[base], optional)
    return table


_FIELD_TYPES = _field_types()


def _is_kind(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # bool is an int subclass; True is not a step count
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _coerce(name: str, value: Any) -> Any:
    kind, _ = _FIELD_TYPES[name]
    if isinstance(value, str) and kind in (int, float):
        try:
            number = float(value)
        except ValueError:
            return value  # reported by validation with the accepted type
        if kind is int:
            return int(number) if number.is_integer() else value
        return number
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


__all__ = ["TrainConfig", "TrainConfigError", "TASKS", "LOOP_TASKS", "SCHEDULERS", "PRECISIONS", "config_changes"]
