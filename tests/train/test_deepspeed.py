"""peftkit.train under DeepSpeed ZeRO stage 2 over two CPU processes (gloo): the adapter of one
process with the same global batch, whole-tensor checkpoints, and exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny_train import lm_rows, max_diff, tiny_llama
from safetensors.torch import load_file

from peftkit.train import TrainConfig, list_checkpoints, train
from peftkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("deepspeed_worker.py")
COMMON = dict(max_steps=4, grad_accum=2, seed=3, lr=1e-2, save_every=2, eval_every=4, log_every=1, progress=False,
              max_grad_norm=0.5)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """Four runs in one torchrun launch: plain (no dropout), straight with dropout, the latter
    resumed from its step-2 checkpoint into another folder, and one whose loss turns NaN."""
    root = tmp_path_factory.mktemp("deepspeed")
    runs = [
        {"dropout": 0.0, "config": dict(COMMON, output_dir=str(root / "plain"), micro_batch_size=2)},
        {"dropout": 0.1, "config": dict(COMMON, output_dir=str(root / "straight"), micro_batch_size=2)},
        {"dropout": 0.1, "config": dict(COMMON, output_dir=str(root / "resumed"), micro_batch_size=2,
                                        resume_from=str(root / "straight" / "checkpoint-2"))},
        {"dropout": 0.0, "nan_after_step": 2,
         "config": dict(COMMON, output_dir=str(root / "nan"), micro_batch_size=2, max_grad_norm=None)},
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           *[json.dumps(run) for run in runs]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError("torchrun failed:\n" + proc.stderr[-6000:])
    return root


def _adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_zero2_matches_one_process_with_the_same_global_batch(deepspeed_runs, tmp_path):
    single_dir = tmp_path / "single"
    result = train(tiny_llama(), lm_rows(13, seed=11), lm_rows(5, seed=12),
                   TrainConfig(**COMMON, output_dir=str(single_dir), micro_batch_size=4))
    zero_dir = deepspeed_runs / "plain"
    assert max_diff(_adapter(zero_dir), _adapter(single_dir)) < 1e-5
    summary = json.loads((zero_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert abs(summary["final_eval"]["eval_loss"] - result.eval_metrics["eval_loss"]) < 1e-5
    # Loss scaling (DeepSpeed divides by its accumulation steps), clipping at 0.5 by the engine
    # and the gradient norm it reports all agree with the loop's own single-process step.
    steps = [r for r in read_metrics(zero_dir / "metrics.jsonl") if "loss" in r]
    single_steps = [r for r in read_metrics(single_dir / "metrics.jsonl") if "loss" in r]
    assert len(steps) == len(single_steps) == 4
    for a, b in zip(steps, single_steps):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"]
        assert abs(a["lr"] - b["lr"]) < 1e-12
    assert any(r["grad_norm"] > 0.5 for r in single_steps)  # clipping did act

    # The optimizer state is gathered from ZeRO's partitions into the single-process layout.
    assert [step for step, _ in list_checkpoints(zero_dir)] == [2, 4]
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        zero = load_file(str(zero_dir / "checkpoint-2" / name))
        single = load_file(str(single_dir / "checkpoint-2" / name))
        assert zero.keys() == single.keys()
        assert max_diff(zero, single) < 1e-5
    assert json.loads((zero_dir / "checkpoint-2" / "optimizer.json").read_text())["param_names"] == \
        json.loads((single_dir / "checkpoint-2" / "optimizer.json").read_text())["param_names"]


def test_zero2_resume_continues_exactly(deepspeed_runs):
    straight, resumed = deepspeed_runs / "straight", deepspeed_runs / "resumed"
    # Dropout 0.1: equal only if weights (and DeepSpeed's fp32 masters), the re-partitioned
    # Adam moments and step, and every rank's RNG came back.
    assert max_diff(_adapter(resumed), _adapter(straight)) < 1e-6
    assert max_diff(_adapter(resumed), _adapter(deepspeed_runs / "plain")) > 1e-4
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")


def test_zero2_nan_loss_stops_before_the_engine_applies_the_step(deepspeed_runs):
    # The engine steps inside the last micro-batch's backward, before the loop sees the loss;
    # DeepSpeed skips a step whose gradient norm is not finite (with or without clipping), and
    # the loop then stops: no NaN update reaches the weights.
    folder = deepspeed_runs / "nan"
    stopped = json.loads((folder / "stopped.json").read_text())
    assert stopped["step"] == 3 and "loss is nan at optimizer step 3" in stopped["message"]
    assert [step for step, _ in list_checkpoints(folder)] == [2]
    after = load_file(str(folder / "weights_after_stop.safetensors"))
    assert max_diff(after, load_file(str(folder / "checkpoint-2" / "trainable.safetensors"))) == 0
