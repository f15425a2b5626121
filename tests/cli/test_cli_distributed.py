"""`peftkit train` under torchrun: two CPU processes (gloo) train the adapter one process
trains with the same global batch, and write the run's files once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cli_helpers import causal_config, read_metrics
from safetensors.torch import load_file

from peftkit.cli import main


def test_torchrun_two_processes_match_one_process(tmp_path, llama_dir):
    for name in ("ddp", "single"):
        (tmp_path / name).mkdir()
    ddp_config = causal_config(tmp_path / "ddp", llama_dir, "prompt_completion", micro_batch_size=2, max_steps=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "peftkit", "train", ddp_config]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 0 alone prints the run's lines (data summary, model, summary), once.
    for line in ("data: task causal-lm", "model: ", "done in ", "output: "):
        assert proc.stdout.count(line) == 1, proc.stdout
    single_config = causal_config(tmp_path / "single", llama_dir, "prompt_completion", micro_batch_size=4, max_steps=4)
    assert main(["train", single_config]) == 0

    ddp_out, single_out = tmp_path / "ddp" / "run", tmp_path / "single" / "run"
    ddp_adapter = load_file(str(ddp_out / "adapter_model.safetensors"))
    single_adapter = load_file(str(single_out / "adapter_model.safetensors"))
    assert ddp_adapter.keys() == single_adapter.keys()
    assert max(float((ddp_adapter[k] - single_adapter[k]).abs().max()) for k in ddp_adapter) < 1e-5
    assert max(float(t.abs().max()) for k, t in ddp_adapter.items() if "lora_B" in k) > 1e-3  # it trained

    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 4
    # One process writes the log: one record per step, not one per process.
    assert [r["step"] for r in read_metrics(ddp_out) if "loss" in r] == [1, 2, 3, 4]
    ddp_losses = [r["loss"] for r in read_metrics(ddp_out) if "loss" in r]
    single_losses = [r["loss"] for r in read_metrics(single_out) if "loss" in r]
    assert max(abs(a - b) for a, b in zip(ddp_losses, single_losses)) < 1e-5
