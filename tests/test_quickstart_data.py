"""The bundled quickstart dataset: shape, labels, balance, split hygiene, reproducibility."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

LABELS = {
    "billing",
    "shipping",
    "technical_issue",
    "account_access",
    "returns_refunds",
    "product_question",
}
GENERATOR = Path(__file__).resolve().parents[1] / "tools" / "make_quickstart_data.py"


def _quickstart_file(name: str):
    # Read through the installed package, as `peftkit train` will, not via a source path.
    return files("peftkit") / "quickstart" / name


def _load(name: str) -> list[dict]:
    text = _quickstart_file(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _load("train.jsonl")


@pytest.fixture(scope="module")
def eval_rows() -> list[dict]:
    return _load("eval.jsonl")


def test_sizes_and_labels(train, eval_rows):
    assert len(train) >= 1000
    assert len(eval_rows) >= 200
    assert set(r["label"] for r in train) == LABELS
    assert set(r["label"] for r in eval_rows) == LABELS


@pytest.mark.parametrize("split", ["train.jsonl", "eval.jsonl"])
def test_every_row_is_well_formed(split):
    for i, row in enumerate(_load(split)):
        assert set(row) == {"text", "label"}, f"{split} line {i + 1}: keys {sorted(row)}"
        assert isinstance(row["text"], str) and row["text"].strip(), f"{split} line {i + 1}"
        assert row["label"] in LABELS, f"{split} line {i + 1}: unknown label {row['label']!r}"
        assert 8 <= len(row["text"].split()) <= 60, f"{split} line {i + 1}: {row['text']!r}"


def test_no_duplicates_and_no_train_eval_overlap(train, eval_rows):
    train_texts = [r["text"] for r in train]
    eval_texts = [r["text"] for r in eval_rows]
    assert len(set(train_texts)) == len(train_texts)
    assert len(set(eval_texts)) == len(eval_texts)
    assert not set(train_texts) & set(eval_texts)


def test_classes_are_balanced(train, eval_rows):
    for rows in (train, eval_rows):
        counts = Counter(r["label"] for r in rows)
        for label, n in counts.items():
            assert n >= 0.10 * len(rows), f"{label}: {n} of {len(rows)}"


def test_label_names_rarely_appear_in_own_texts(train):
    # The task must not be solvable by spotting the label's own word.
    for label in LABELS:
        stems = [w.rstrip("s") for w in label.split("_")]
        own = [r["text"].lower() for r in train if r["label"] == label]
        share = sum(any(s in t for s in stems) for t in own) / len(own)
        assert share < 0.5, f"{label}: {share:.0%} of its texts contain its name"


def test_committed_files_match_the_generator(tmp_path):
    if not GENERATOR.exists():
        pytest.skip("tools/ is not shipped with the installed package")
    spec = importlib.util.spec_from_file_location("make_quickstart_data", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    # The generator imports its sibling quickstart_material.py.
    sys.path.insert(0, str(GENERATOR.parent))
    try:
        spec.loader.exec_module(module)
        module.write(tmp_path)
    finally:
        sys.path.remove(str(GENERATOR.parent))
    for name in ("train.jsonl", "eval.jsonl", "DATA.md"):
        committed = _quickstart_file(name).read_text(encoding="utf-8")
        assert (tmp_path / name).read_text(encoding="utf-8") == committed, (
            f"{name} differs from tools/make_quickstart_data.py output; rerun the generator"
        )
