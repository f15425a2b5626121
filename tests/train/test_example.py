"""examples/train_own_loop.py runs, learns, and its adapter reloads to the same model."""

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_own_loop.py"


def test_example_trains_and_reloads(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_own_loop_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(str(tmp_path))
    printed = capsys.readouterr().out
    assert "reloaded adapter reproduces the trained model: True" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["stopped_reason"] == "completed"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "\"loss\"" in line]
    assert losses[-1] < losses[0] - 0.5
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-20"]
