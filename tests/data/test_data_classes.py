"""Class names of seq-cls labels and token-cls tags come from one rule."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import pytest

from peftkit.data.classes import class_names
from peftkit.data.errors import DataError


@dataclass
class _Source:
    path: str


@dataclass
class _Loaded:
    dataset: datasets.Dataset
    source: _Source


def _loaded(rows: list[dict], features: datasets.Features | None = None, path: str = "a.jsonl") -> _Loaded:
    return _Loaded(datasets.Dataset.from_list(rows, features=features), _Source(path))


def test_labels_and_tags_give_the_same_names_for_the_same_values():
    labels = [_loaded([{"label": "pos"}, {"label": "neg"}]), _loaded([{"label": "neu"}])]
    tags = [_loaded([{"tags": ["pos", "neg"]}, {"tags": ["neu"]}])]
    assert class_names(labels, "label") == class_names(tags, "tags") == (
        ["neg", "neu", "pos"], {"neg": 0, "neu": 1, "pos": 2})
    assert class_names([_loaded([{"label": 2}, {"label": 0}])], "label")[0] == ["0", "1", "2"]
    assert class_names([_loaded([{"tags": [2, 0]}])], "tags")[0] == ["0", "1", "2"]


def test_class_label_features_give_their_names_and_kinds_do_not_mix():
    names = ["O", "B-PER"]
    tagged = _loaded([{"tags": [0, 1]}], datasets.Features({"tags": datasets.List(datasets.ClassLabel(names=names))}))
    assert class_names([tagged], "tags") == (names, {0: 0, 1: 1})
    labelled = _loaded([{"label": 1}], datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])}))
    assert class_names([labelled], "label") == (["a", "b"], {0: 0, 1: 1})
    with pytest.raises(DataError, match="training tags mix tag names .strings. and class indices"):
        class_names([_loaded([{"tags": ["x"]}]), _loaded([{"tags": [1]}])], "tags")
    with pytest.raises(DataError, match="some training sources use ClassLabel labels and others plain labels"):
        class_names([labelled, _loaded([{"label": "b"}])], "label")
    with pytest.raises(DataError, match="no training row has a label"):
        class_names([_loaded([{"label": None}])], "label")
