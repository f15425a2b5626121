"""`DataConfig`: every data setting, validated as a whole (the `data:` section of a run's YAML)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .tasks import TASKS

# Row formats a user may name; "auto" detects one from the column names.
FORMATS = ("auto", "text", "prompt_completion", "alpaca", "messages", "classification", "token_classification")
# Column names the formats read; `column_mapping` renames user columns onto these.
CANONICAL_COLUMNS = (
    "text", "prompt", "completion", "instruction", "input", "output", "messages", "label", "tokens", "tags",
)  # fmt: skip
OVERFLOW_POLICIES = ("truncate", "drop", "error")
TRAIN_ON = ("completion", "all")


def default_cache_dir() -> str:
    """`$PEFTKIT_DATA_CACHE`, else `$XDG_CACHE_HOME/peftkit/data`, else `~/.cache/peftkit/data`."""
    if os.environ.get("PEFTKIT_DATA_CACHE"):
        return os.environ["PEFTKIT_DATA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "peftkit", "data")


@dataclass
class DataConfig:
    """Where the rows come from and how they become token sequences.

    path:          a file (.jsonl/.json/.csv/.parquet), a folder (written by `datasets`
                   `save_to_disk`, or holding such files), a Hugging Face hub dataset id, or a list.
    eval_path:     the same for evaluation rows; leave unset to hold out `eval_split` instead.
    eval_split:    fraction of the training rows held out for evaluation (seeded), 0 for none.
    split:         which split to read when a source is a hub id or a saved `DatasetDict`.
    format:        "auto" (detect from the column names) or one of the named row formats.
    column_mapping: {user column: canonical column}, e.g. {"question": "prompt"}.
    max_length:    longest sequence in tokens (a packed sequence too).
    overflow:      what happens to a longer row: "truncate", "drop" or "error".
    train_on:      "completion" (loss only on completions / assistant turns) or "all";
                   plain text rows are always trained on every token.
    add_eos:       end each causal-LM example (and seq2seq target) with the EOS token, trained.
    packing:       pack several causal-LM rows per sequence (rows never attend to each other).
    label_all_subwords: token-cls: every sub-word of a word carries the word's tag (default: only
                   the first; the others are -100 and not trained or scored).
    cache_dir:     where tokenized data is cached; unset for `default_cache_dir()`.
    seed:          seeds the eval hold-out.
    system_prompt: prepended as a system message (messages) or a preamble (alpaca).
    """

    path: str | list[str] | None = None
    eval_path: str | list[str] | None = None
    eval_split: float = 0.0
    split: str = "train"
    format: str = "auto"
    column_mapping: dict[str, str] = field(default_factory=dict)
    max_length: int = 1024
    overflow: str = "truncate"
    train_on: str = "completion"
    add_eos: bool = True
    packing: bool = False
    label_all_subwords: bool = False
    cache_dir: str | None = None
    seed: int = 42
    system_prompt: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        """Build from a mapping (a YAML `data:` section); unknown keys and bad values raise together."""
        if not isinstance(values, dict):
            raise DataError(f"data settings must be a mapping, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        problems = [f"data.{key}: unknown setting; accepted settings are {', '.join(names)}" for key in unknown]
        config = cls(**{k: v for k, v in values.items() if k in names})
        problems += config.problems()
        if problems:
            raise DataError("invalid data settings:\n  " + "\n  ".join(problems))
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def paths(self) -> list[str]:
        return _as_list(self.path)

    def eval_paths(self) -> list[str]:
        return _as_list(self.eval_path)

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or default_cache_dir()

    def validate(self) -> None:
        """Raise one `DataError` listing every bad value (and what is accepted)."""
        problems = self.problems()
        if problems:
            raise DataError("invalid data settings:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with the settings, one line each; empty when valid."""
        out: list[str] = []
        out += _path_problems("path", self.path, required=True)
        out += _path_problems("eval_path", self.eval_path, required=False)
        if isinstance(self.eval_split, bool) or not isinstance(self.eval_split, (int, float)):
            out.append(f"data.eval_split: {self.eval_split!r} is not a number; use a fraction in [0, 1), e.g. 0.05")
        elif not 0.0 <= self.eval_split < 1.0:
            out.append(f"data.eval_split: {self.eval_split!r} is outside [0, 1); use e.g. 0.05, or 0 for no hold-out")
        elif self.eval_split > 0 and self.eval_path:
            out.append(
                f"data.eval_split: {self.eval_split!r} is set together with data.eval_path; "
                "use eval_path for a separate eval file or eval_split to hold out training rows, not both"
            )
        if not isinstance(self.split, str) or not self.split:
            out.append(f"data.split: {self.split!r} is not a split name; use e.g. 'train'")
        if self.format not in FORMATS:
            out.append(f"data.format: {self.format!r} is not a known format; accepted: {', '.join(FORMATS)}")
        out += _mapping_problems(self.column_mapping)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            out.append(f"data.max_length: {self.max_length!r} is not an integer >= 2 (tokens per sequence)")
        if self.overflow not in OVERFLOW_POLICIES:
            out.append(f"data.overflow: {self.overflow!r} is not a policy; accepted: {', '.join(OVERFLOW_POLICIES)}")
        if self.train_on not in TRAIN_ON:
            out.append(f"data.train_on: {self.train_on!r} is not accepted; accepted: {', '.join(TRAIN_ON)}")
        for name in ("add_eos", "packing", "label_all_subwords"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                out.append(f"data.{name}: {value!r} is not a boolean; use true or false")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            out.append(f"data.cache_dir: {self.cache_dir!r} is not a folder path; use a path or leave it unset")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            out.append(f"data.seed: {self.seed!r} is not a non-negative integer")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            out.append(f"data.system_prompt: {self.system_prompt!r} is not a string; use text or leave it unset")
        return out


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _path_problems(name: str, value: Any, required: bool) -> list[str]:
    if value is None or value == [] or value == "":
        return [f"data.{name}: required; give a data file, folder or hub dataset id"] if required else []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
        return [f"data.{name}: {value!r} is not a path or a list of paths"]
    return []


def _mapping_problems(mapping: Any) -> list[str]:
    if not isinstance(mapping, dict):
        return [f"data.column_mapping: {mapping!r} is not a mapping of {{your column: canonical column}}"]
    out = []
    for source, target in mapping.items():
        if not isinstance(source, str) or not source:
            out.append(f"data.column_mapping: key {source!r} is not a column name")
        if target not in CANONICAL_COLUMNS:
            out.append(
                f"data.column_mapping[{source!r}]: {target!r} is not a canonical column; "
                f"accepted: {', '.join(CANONICAL_COLUMNS)}"
            )
    targets = list(mapping.values())
    for target in sorted({t for t in targets if isinstance(t, str) and targets.count(t) > 1}):
        sources = [s for s, t in mapping.items() if t == target]
        out.append(f"data.column_mapping: columns {sources} all map to {target!r}; map only one column to it")
    return out
