"""The one collator: right padding to the longest row, labels padded with -100, packed rows
kept apart. The recipe's data and the loop's default collate (`train.make_collate`) both use it.

Packed causal-LM batches and transformers 5.x
---------------------------------------------
transformers can detect packing from `position_ids` alone (`masking_utils.
find_packed_sequence_indices`), but only when `attention_mask` is None *and no cache is
passed*. Llama-style models create a `DynamicCache` whenever `use_cache` is true, and it
defaults to `config.use_cache=True`, also in training mode; then the detection is skipped
and rows silently attend to earlier rows of their sequence (checked on 5.24: max logit
error 0.3-0.6 on a tiny Llama). So by default (`packed_attention="mask"`) the collator
builds an explicit 4D block-diagonal causal mask [batch, 1, seq, seq] (additive: 0 where
attention is allowed, the float32 minimum elsewhere); transformers passes a 4D mask through
unchanged, and eager and sdpa attention both accept it, also for bf16 models / autocast.
`packed_attention="position_ids"` emits no mask (flash-attention varlen, or a caller that
always passes `use_cache=False`); it is O(seq) memory instead of O(seq^2).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .config import TASKS
from .errors import DataError
from .tokenization import IGNORE_INDEX

# How packed causal-LM rows are kept apart: an explicit block-diagonal "mask", or "position_ids"
# alone (see the module docstring for when each is right).
PACKED_ATTENTION_MODES = ("mask", "position_ids")


class DataCollator:
    """Pads a list of rows (dicts of token lists) into tensors, padding on the right.

    Rows: input_ids; optional attention_mask, token_type_ids and position_ids (same length);
    labels: one class per row for seq-cls (`label` is accepted too), a target list for seq2seq,
    one label per token (-100 = ignored) for causal-lm and token-cls. A causal-LM row without
    labels learns every token.
    Returns input_ids [B, L], attention_mask [B, L], labels [B, L] (causal-lm, token-cls),
    [B, T] (seq2seq) or [B] (seq-cls). Causal-LM rows with position_ids are packed rows (each
    0 starts one): they get position_ids [B, L] and attention_mask [B, 1, L, L] (or none, with
    packed_attention="position_ids"); other tasks pass position_ids through, padded with 0.
    Padded label positions are always -100 regardless of the pad id, so a pad id equal to
    the EOS id never hides a trained EOS.
    """

    def __init__(
        self,
        pad_token_id: int,
        task: str = "causal-lm",
        packed_attention: str = "mask",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        problems = []
        if task not in TASKS:
            problems.append(f"task {task!r} is not accepted; accepted: {', '.join(TASKS)}")
        if packed_attention not in PACKED_ATTENTION_MODES:
            accepted = ", ".join(PACKED_ATTENTION_MODES)
            problems.append(f"packed_attention {packed_attention!r} is not accepted; accepted: {accepted}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            problems.append(f"pad_to_multiple_of {pad_to_multiple_of!r} is not a positive integer")
        if problems:
            raise DataError("invalid collator settings: " + "; ".join(problems))
        self.pad_token_id = int(pad_token_id)
        self.task = task
        self.packed_attention = packed_attention
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty list of examples")
        ids = [_int_list(f, "input_ids", i) for i, f in enumerate(features)]
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise DataError(f"row {empty[0]}: input_ids must be a non-empty list of ints, got []")
        length = self._padded_length(max(len(x) for x in ids))
        masks = [_optional_list(f, "attention_mask", i, ids) or [1] * len(x)
                 for i, (f, x) in enumerate(zip(features, ids))]
        batch = {"input_ids": _pad(ids, length, self.pad_token_id), "attention_mask": _pad(masks, length, 0)}
        token_types = _all_or_none(features, "token_type_ids", ids, "token_type_ids is given for some rows of a "
                                   "batch but not for others")
        if token_types is not None:
            batch["token_type_ids"] = _pad(token_types, length, 0)
        batch["labels"] = self._labels(features, ids, length)
        positions = _all_or_none(features, "position_ids", ids, "cannot collate packed examples (with "
                                 "position_ids) together with unpacked ones")
        if positions is None:
            return batch
        if self.task != "causal-lm":
            batch["position_ids"] = _pad(positions, length, 0)
            return batch
        # Packed rows: padding continues as its own row (positions from 0), so it is a separate block.
        batch["position_ids"] = torch.tensor([p + list(range(length - len(p))) for p in positions], dtype=torch.long)
        # A row's own attention_mask (rare with packing) still hides its masked keys.
        key_mask = batch["attention_mask"] if any(0 in m for m in masks) else None
        if self.packed_attention == "mask":
            batch["attention_mask"] = block_causal_mask(batch["position_ids"], key_mask=key_mask)
        elif key_mask is not None:
            raise DataError("packed_attention='position_ids' sends no attention_mask, but rows carry one with 0s; "
                            "use packed_attention='mask'")
        else:
            del batch["attention_mask"]
        return batch

    def _labels(self, features: Sequence[Mapping[str, Any]], ids: list[list[int]], length: int) -> torch.Tensor:
        if self.task == "seq-cls":
            return torch.tensor([_class_index(f, i) for i, f in enumerate(features)], dtype=torch.long)
        if self.task in ("seq2seq", "token-cls"):
            missing = [i for i, f in enumerate(features) if f.get("labels") is None]
            if missing:
                need = "target ids" if self.task == "seq2seq" else "one class id (or -100) per token"
                raise DataError(f"rows {missing} have no labels; {_TASK_NAMES[self.task]} needs {need}")
        if self.task == "seq2seq":
            labels = [_int_list(f, "labels", i) for i, f in enumerate(features)]
            return _pad(labels, self._padded_length(max(len(x) for x in labels)), IGNORE_INDEX)
        labels = [_optional_list(f, "labels", i, ids) or x for i, (f, x) in enumerate(zip(features, ids))]
        return _pad(labels, length, IGNORE_INDEX)

    def _padded_length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else (n + m - 1) // m * m


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask [B, 1, L, L] from position_ids [B, L] (each 0 starts a new row).

    0 where query i may attend key j (j <= i, same row, and key_mask[j] != 0 when given), the
    dtype's minimum elsewhere.
    """
    row = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = causal & (row[:, :, None] == row[:, None, :])
    if key_mask is not None:
        allowed &= key_mask[:, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def make_collator(
    tokenizer: Any, task: str = "causal-lm", packed_attention: str = "mask", pad_to_multiple_of: int | None = None
) -> DataCollator:
    """A `DataCollator` padding with the tokenizer's pad id (else its EOS id, else 0).

    The pad id only fills input_ids; padded positions are masked from attention and loss.
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return DataCollator(pad, task=task, packed_attention=packed_attention, pad_to_multiple_of=pad_to_multiple_of)


_TASK_NAMES = {"seq2seq": "sequence-to-sequence", "token-cls": "token classification"}


def _int_list(row: Mapping[str, Any], key: str, index: int) -> list[int]:
    if not isinstance(row, Mapping):
        raise DataError(f"row {index}: expected a dict of fields, got {type(row).__name__}")
    if row.get(key) is None:
        raise DataError(f"row {index} has no {key!r}; its fields are {sorted(row)}")
    value = row[key]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"row {index}: {key} must be a list of ints, got {value!r}")
    return list(value)


def _optional_list(row: Mapping[str, Any], key: str, index: int, ids: list[list[int]]) -> list[int] | None:
    """`row[key]` as a list as long as the row's input_ids, or None when the row has none."""
    if row.get(key) is None:
        return None
    value = _int_list(row, key, index)
    if len(value) != len(ids[index]):
        raise DataError(f"row {index}: {key} has {len(value)} entries but input_ids has {len(ids[index])}")
    return value


def _all_or_none(features: Sequence[Mapping[str, Any]], key: str, ids: list[list[int]],
                 mixed: str) -> list[list[int]] | None:
    present = [f.get(key) is not None for f in features]
    if not any(present):
        return None
    if not all(present):
        raise DataError(f"{mixed} (row {present.index(False)} has no {key})")
    return [_optional_list(f, key, i, ids) for i, f in enumerate(features)]


def _class_index(row: Mapping[str, Any], index: int) -> int:
    value = row.get("labels", row.get("label"))
    value = value.item() if isinstance(value, (torch.Tensor, np.ndarray)) else value
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise DataError(f"row {index}: labels={value!r}: sequence classification expects one int class per row")
    return int(value)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
