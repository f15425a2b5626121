"""Packing several tokenized causal-LM rows into sequences of at most `max_length` tokens.

A packed sequence stores `position_ids` that restart at 0 for every row; the collator turns
them into a block-diagonal causal attention mask so rows never attend to each other (see
collate.py for why the mask is built explicitly).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import datasets


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group row indices into bins whose lengths sum to at most `max_length`.

    Best-fit decreasing: longest rows first, each into the fullest bin it still fits in.
    Deterministic; rows inside a bin keep their original order. Every length must be
    in [1, max_length].
    """
    bad = [(i, n) for i, n in enumerate(lengths) if not 1 <= n <= max_length]
    if bad:
        i, n = bad[0]
        raise ValueError(f"row {i} has length {n}; packing needs every length in [1, {max_length}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    for i in order:
        n = lengths[i]
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            bins.append([i])
            space, bin_id = max_length - n, len(bins) - 1
        else:
            space, bin_id = free.pop(slot)
            bins[bin_id].append(i)
            space -= n
        if space > 0:
            bisect.insort(free, (space, bin_id))
    return [sorted(b) for b in bins]


def pack_dataset(
    dataset: datasets.Dataset, lengths: Sequence[int], max_length: int, cache_file_name: str, fingerprint: str
) -> datasets.Dataset:
    """Packed copy of `dataset` (columns input_ids, labels; `lengths` = tokens per row).

    Returns a dataset with input_ids, labels and position_ids, one packed sequence per row.
    """
    bins = pack_lengths([int(n) for n in lengths], max_length)
    rows = dataset.select_columns(["input_ids", "labels"])

    def build(batch: dict[str, list]) -> dict[str, list]:
        flat = [i for members in batch["rows"] for i in members]
        taken = rows[flat]
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        k = 0
        for members in batch["rows"]:
            ids, labels, positions = [], [], []
            for _ in members:
                ids += taken["input_ids"][k]
                labels += taken["labels"][k]
                positions += range(len(taken["input_ids"][k]))
                k += 1
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
        return out

    features = datasets.Features(
        {name: datasets.List(datasets.Value("int32")) for name in ("input_ids", "labels", "position_ids")}
    )
    return datasets.Dataset.from_dict({"rows": bins}).map(
        build,
        batched=True,
        batch_size=256,
        remove_columns=["rows"],
        features=features,
        cache_file_name=cache_file_name,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc="Packing",
    )
