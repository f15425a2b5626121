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
    """The loop's default collate: `data.DataCollator` (right padding, labels padded with -100,
    an attention_mask built; a causal-LM row without labels learns every token)."""
    from ..data.collate import DataCollator  # lazy: peftkit.data loads datasets

    return DataCollator(pad_token_id, task=task)


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
