"""Which rows each process reads at each step, the default collate, and a data fingerprint.

The order is a pure function of (seed, epoch), so a run resumes at an exact position by
saving only (epoch, step_in_epoch, seed), whatever the number of processes reading it.

One optimizer step reads one *window* of `micro_batch_size * grad_accum * num_processes`
consecutive rows of the epoch's order. Micro-step j of the window is the global chunk
`window[j*m*P:(j+1)*m*P]` and process r reads `chunk[r*m:(r+1)*m]` of it, so P processes
with micro-batch m read exactly the rows one process with micro-batch m*P reads.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

Batch = dict[str, torch.Tensor]
CollateFn = Callable[[list[Mapping[str, Any]]], Batch]

# Row fields the default collate passes to the model; other fields (text, ids...) are dropped.
MODEL_FIELDS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class DataPlan:
    """Row order and window layout of a training set of `num_rows` rows."""

    num_rows: int
    micro_batch_size: int
    grad_accum: int
    num_processes: int
    seed: int
    shuffle: bool

    @property
    def window_size(self) -> int:
        """Rows per optimizer step, over all processes."""
        return self.micro_batch_size * self.grad_accum * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        # The last window of an epoch may be partial; it is trained on, not dropped.
        return math.ceil(self.num_rows / self.window_size)

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        # A private generator: the order must not depend on (or disturb) the global RNG.
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=gen).tolist()

    def micro_batches(self, order: list[int], step_in_epoch: int, rank: int) -> list[list[int]]:
        """Row indices process `rank` reads in each micro-step of window `step_in_epoch`.

        Every process gets the same number of micro-steps (collectives must match); an
        empty list means this process has no row in that micro-step (a partial last window).
        """
        window = order[step_in_epoch * self.window_size : (step_in_epoch + 1) * self.window_size]
        chunk = self.micro_batch_size * self.num_processes
        out = []
        for start in range(0, len(window), chunk):
            part = window[start : start + chunk]
            out.append(part[rank * self.micro_batch_size : (rank + 1) * self.micro_batch_size])
        return out


def make_collate(pad_token_id: int, task: str) -> CollateFn:
    """Right-pad `input_ids` to the longest row; labels pad with -100; attention_mask built.

    Rows: `input_ids` (list of int), optional `attention_mask`, `position_ids`,
    `token_type_ids` (same length), `labels` (token labels, -100 = ignored, for "causal-lm" and
    "token-cls"; one int class for "seq-cls"). A causal-LM row without labels learns every token.
    """

    def collate(rows: list[Mapping[str, Any]]) -> Batch:
        if not rows:
            raise ValueError("collate got an empty list of rows")
        seqs = [_int_list(row, "input_ids", i) for i, row in enumerate(rows)]
        width = max(len(s) for s in seqs)
        batch: Batch = {"input_ids": _pad(seqs, width, pad_token_id)}
        masks = [
            _int_list(row, "attention_mask", i) if row.get("attention_mask") is not None else [1] * len(s)
            for i, (row, s) in enumerate(zip(rows, seqs))
        ]
        _check_lengths(masks, seqs, "attention_mask")
        batch["attention_mask"] = _pad(masks, width, 0)
        for name in ("position_ids", "token_type_ids"):
            present = [row.get(name) is not None for row in rows]
            if any(present):
                if not all(present):
                    raise ValueError(f"{name} is given for some rows of a batch but not for others")
                values = [_int_list(row, name, i) for i, row in enumerate(rows)]
                _check_lengths(values, seqs, name)
                batch[name] = _pad(values, width, 0)
        batch["labels"] = _labels(rows, seqs, width, task)
        return batch

    return collate


def _labels(rows: list[Mapping[str, Any]], seqs: list[list[int]], width: int, task: str) -> torch.Tensor:
    if task == "seq-cls":
        labels = []
        for i, row in enumerate(rows):
            value = row.get("labels", row.get("label"))
            value = value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(
                    f"row {i}: labels={value!r}: sequence classification expects one int class per row"
                )
            labels.append(int(value))
        return torch.tensor(labels, dtype=torch.long)
    if task == "token-cls":
        missing = [i for i, row in enumerate(rows) if row.get("labels") is None]
        if missing:
            raise ValueError(f"rows {missing} have no labels; token classification needs one class id "
                             "(or -100) per token")
    values = [
        seq if row.get("labels") is None else _int_list(row, "labels", i)  # no labels: learn every token
        for i, (row, seq) in enumerate(zip(rows, seqs))
    ]
    _check_lengths(values, seqs, "labels")
    return _pad(values, width, -100)


def _int_list(row: Mapping[str, Any], key: str, index: int) -> list[int]:
    if not isinstance(row, Mapping):
        raise TypeError(f"row {index}: expected a dict of fields, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise ValueError(f"row {index} has no {key!r}; its fields are {sorted(row)}")
    value = row[key]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"row {index}: {key} must be a non-empty list of ints, got {value!r}")
    return list(value)


def _check_lengths(values: list[list[int]], seqs: list[list[int]], name: str) -> None:
    for i, (v, s) in enumerate(zip(values, seqs)):
        if len(v) != len(s):
            raise ValueError(f"row {i}: {name} has {len(v)} entries but input_ids has {len(s)}")


def _pad(seqs: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def data_fingerprint(data: Sequence[Mapping[str, Any]]) -> str:
    """Hash of the model fields of every row, column by column (lengths, then values).

    A `datasets.Dataset` is hashed from its Arrow columns without a Python loop over rows;
    it gives the same hash as a list holding the same rows.
    """
    h = hashlib.sha256(f"rows={len(data)}".encode())
    table = getattr(data, "data", None)
    arrow = table is not None and hasattr(table, "column_names") and getattr(data, "_indices", None) is None
    for key in FINGERPRINT_FIELDS:
        column = _arrow_column(table, key) if arrow else _row_column(data, key)
        if column is None:
            continue
        lengths, values = column
        h.update(key.encode())
        if lengths is not None:
            h.update(np.asarray(lengths, dtype=np.int64).tobytes())
        h.update(np.asarray(values, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


FINGERPRINT_FIELDS = MODEL_FIELDS + ("label",)


def _row_column(data: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int] | None, np.ndarray] | None:
    values = [row.get(key) if isinstance(row, Mapping) else None for row in data]
    if all(v is None for v in values):
        return None
    if any(isinstance(v, (list, tuple, np.ndarray, torch.Tensor)) for v in values):
        parts = [np.asarray([] if v is None else v, dtype=np.int64).reshape(-1) for v in values]
        return [len(p) for p in parts], np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return None, np.asarray([-1 if v is None else v for v in values], dtype=np.int64)


def _arrow_column(table: Any, key: str) -> tuple[np.ndarray | None, np.ndarray] | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if key not in table.column_names:
        return None
    column = table.column(key)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        return lengths, pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return None, pc.fill_null(column, -1).to_numpy(zero_copy_only=False)
