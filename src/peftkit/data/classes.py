"""The class names of a classification run and the value -> class id map, read from the
training sources: one rule for seq-cls labels (`label`, one per row) and token-cls tags
(`tags`, one per word)."""

from __future__ import annotations

from typing import Any

import datasets
import pyarrow.compute as pc

from .errors import DataError

# Per column: what one value is called in messages, and whether the column holds a list per row.
_COLUMNS = {"label": ("label", False), "tags": ("tag", True)}


def class_names(train_loaded: list[Any], column: str) -> tuple[list[str], dict[str | int, int]]:
    """Class names of `column` ("label" or "tags") over the training sources (`LoadedSource`s).

    ClassLabel features give their names (the same in every source); string values give their
    sorted set; integer values give "0" .. str(max). Mixing kinds is an error.
    """
    noun, per_word = _COLUMNS[column]
    class_label_names: list[str] | None = None
    values: set[str | int] = set()
    for item in train_loaded:
        feature = item.dataset.features[column]
        if per_word:
            feature = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            if class_label_names is not None and class_label_names != feature.names:
                raise DataError(f"{item.source.path}: its {noun} ClassLabel names {feature.names} differ from "
                                f"{class_label_names}")
            class_label_names = list(feature.names)
            continue
        for value in _unique_values(item.dataset, column, per_word):
            if value is None or (isinstance(value, float) and not value == value):
                continue  # reported with its row by the row check
            values.add(int(value) if isinstance(value, float) else value)
    if class_label_names is not None:
        if values:
            raise DataError(f"some training sources use ClassLabel {noun}s and others plain {noun}s; use one kind")
        return class_label_names, {i: i for i in range(len(class_label_names))}
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise DataError(
            f"training {noun}s mix {noun} names (strings) and class indices (integers); use one kind: "
            f"{sorted(map(repr, values))[:10]}"
        )
    if not values:
        raise DataError(f"no training row has a {noun}")
    if kinds == {str}:
        names = sorted(values)  # type: ignore[type-var]
        return names, {name: i for i, name in enumerate(names)}
    top = max(values)  # type: ignore[type-var]
    return [str(i) for i in range(top + 1)], {i: i for i in range(top + 1)}


def _unique_values(dataset: datasets.Dataset, column: str, per_word: bool) -> list[Any]:
    if per_word:
        return pc.unique(pc.list_flatten(dataset.data.column(column))).to_pylist()
    return dataset.unique(column)
