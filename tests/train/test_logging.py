"""metrics.jsonl is read back saying what it skipped."""

from __future__ import annotations

import warnings

import pytest

from peftkit.train.logging import read_metrics


def test_a_cut_off_last_line_and_a_damaged_line_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n\n[1, 2]\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning) as caught:
        records = read_metrics(path)
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert messages[0].startswith(f"{path} line 2 is not JSON (")
    assert messages[1] == f"{path} line 4 is list '[1, 2]', not a record; skipped"
    assert messages[2] == f"{path} line 6 is cut off (the run was killed while writing it); skipped"


def test_a_clean_file_or_none_reads_quietly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == [{"step": 1}, {"step": 2}]
        assert read_metrics(tmp_path / "none.jsonl") == []
