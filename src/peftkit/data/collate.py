"""Batching tokenized examples: right padding to the longest example, labels padded with -100.

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

from typing import Any, Sequence

import torch

from .config import TASKS
from .errors import DataError
from .tokenization import IGNORE_INDEX

PACKED_ATTENTION = ("mask", "position_ids")


class DataCollator:
    """Pads a list of examples (dicts with input_ids, labels, optional position_ids) into tensors.

    Returns input_ids [B, L], labels [B, L] (causal-lm, token-cls), [B, T] (seq2seq) or [B] (seq-cls),
    and attention_mask [B, L]; packed causal-LM batches get position_ids [B, L] and
    attention_mask [B, 1, L, L] (or none, with packed_attention="position_ids").
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
        if packed_attention not in PACKED_ATTENTION:
            accepted = ", ".join(PACKED_ATTENTION)
            problems.append(f"packed_attention {packed_attention!r} is not accepted; accepted: {accepted}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            problems.append(f"pad_to_multiple_of {pad_to_multiple_of!r} is not a positive integer")
        if problems:
            raise DataError("invalid collator settings: " + "; ".join(problems))
        self.pad_token_id = int(pad_token_id)
        self.task = task
        self.packed_attention = packed_attention
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("cannot collate an empty list of examples")
        ids = [_as_list(f["input_ids"]) for f in features]
        length = self._padded_length(max(len(x) for x in ids))
        batch = {
            "input_ids": _pad(ids, length, self.pad_token_id),
            "attention_mask": _pad([[1] * len(x) for x in ids], length, 0),
        }
        if self.task == "seq-cls":
            batch["labels"] = torch.tensor([int(_scalar(f["labels"])) for f in features], dtype=torch.long)
            return batch
        labels = [_as_list(f["labels"]) for f in features]
        if self.task == "seq2seq":
            batch["labels"] = _pad(labels, self._padded_length(max(len(x) for x in labels)), IGNORE_INDEX)
            return batch
        batch["labels"] = _pad(labels, length, IGNORE_INDEX)
        if self.task == "token-cls":
            return batch
        packed = ["position_ids" in f for f in features]
        if any(packed) and not all(packed):
            raise DataError("cannot collate packed examples (with position_ids) together with unpacked ones")
        if all(packed):
            # Padding continues as its own row (positions from 0), so it is a separate block.
            positions = [_as_list(f["position_ids"]) for f in features]
            batch["position_ids"] = torch.tensor(
                [p + list(range(length - len(p))) for p in positions], dtype=torch.long
            )
            if self.packed_attention == "mask":
                batch["attention_mask"] = block_causal_mask(batch["position_ids"])
            else:
                del batch["attention_mask"]
        return batch

    def _padded_length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else (n + m - 1) // m * m


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [B, 1, L, L] from position_ids [B, L] (each 0 starts a new row).

    0 where query i may attend key j (j <= i, same row), the dtype's minimum elsewhere.
    """
    row = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = causal & (row[:, :, None] == row[:, None, :])
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


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)
