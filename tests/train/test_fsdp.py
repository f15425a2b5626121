"""peftkit.train with the model sharded by FSDP2 over two CPU processes (gloo): the same
adapter, checkpoints and exact resume as one process with the same global batch."""

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

WORKER = Path(__file__).with_name("fsdp_worker.py")
COMMON = dict(max_steps=4, grad_accum=2, seed=3, lr=1e-2, save_every=2, eval_every=4, log_every=1, progress=False)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Four runs in one torchrun launch: plain (no dropout), straight with dropout, the latter
    resumed from its step-2 checkpoint into another folder, and plain in bf16."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = [
        {"dropout": 0.0, "config": dict(COMMON, output_dir=str(root / "plain"), micro_batch_size=2)},
        {"dropout": 0.1, "config": dict(COMMON, output_dir=str(root / "straight"), micro_batch_size=2)},
        {"dropout": 0.1, "config": dict(COMMON, output_dir=str(root / "resumed"), micro_batch_size=2,
                                        resume_from=str(root / "straight" / "checkpoint-2"))},
        {"dropout": 0.0, "config": dict(COMMON, output_dir=str(root / "bf16"), micro_batch_size=2, precision="bf16")},
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           *[json.dumps(run) for run in runs]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError("torchrun failed:\n" + proc.stderr[-6000:])
    return root


def _adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_fsdp2_matches_one_process_with_the_same_global_batch(fsdp_runs, tmp_path):
    single_dir = tmp_path / "single"
    result = train(tiny_llama(), lm_rows(13, seed=11), lm_rows(5, seed=12),
                   TrainConfig(**COMMON, output_dir=str(single_dir), micro_batch_size=4))
    sharded_dir = fsdp_runs / "plain"
    # The final adapter is gathered whole from the shards and written once, in PEFT format.
    assert max_diff(_adapter(sharded_dir), _adapter(single_dir)) < 1e-5
    assert max_diff(_adapter(sharded_dir), _adapter_of_untrained()) > 1e-3  # it did train
    summary = json.loads((sharded_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert abs(summary["final_eval"]["eval_loss"] - result.eval_metrics["eval_loss"]) < 1e-5
    steps = [r for r in read_metrics(sharded_dir / "metrics.jsonl") if "loss" in r]
    single_steps = [r for r in read_metrics(single_dir / "metrics.jsonl") if "loss" in r]
    assert len(steps) == len(single_steps) == 4
    for a, b in zip(steps, single_steps):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-5

    # Checkpoints hold whole tensors, weights and Adam moments alike: the files equal the
    # single-process ones, so a checkpoint does not depend on how many processes wrote it.
    assert [step for step, _ in list_checkpoints(sharded_dir)] == [2, 4]
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        sharded = load_file(str(sharded_dir / "checkpoint-2" / name))
        single = load_file(str(single_dir / "checkpoint-2" / name))
        assert sharded.keys() == single.keys()
        assert max_diff(sharded, single) < 1e-5
    assert json.loads((sharded_dir / "checkpoint-2" / "optimizer.json").read_text())["param_names"] == \
        json.loads((single_dir / "checkpoint-2" / "optimizer.json").read_text())["param_names"]


def test_fsdp2_bf16_follows_one_process_bf16(fsdp_runs, tmp_path):
    # Accelerate's FSDP2 mixed precision (bf16 parameters and gradient reduction) against
    # one process under bf16 autocast: the same losses and gradient norms, to bf16 precision.
    single_dir = tmp_path / "single"
    train(tiny_llama(), lm_rows(13, seed=11), lm_rows(5, seed=12),
          TrainConfig(**COMMON, output_dir=str(single_dir), micro_batch_size=4, precision="bf16"))
    steps = [r for r in read_metrics(fsdp_runs / "bf16" / "metrics.jsonl") if "loss" in r]
    single_steps = [r for r in read_metrics(single_dir / "metrics.jsonl") if "loss" in r]
    assert len(steps) == len(single_steps) == 4
    for a, b in zip(steps, single_steps):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * b["loss"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 2e-2 * b["grad_norm"]
    assert json.loads((fsdp_runs / "bf16" / "summary.json").read_text())["mixed_precision"] == "bf16"
    assert _adapter(fsdp_runs / "bf16").keys() == _adapter(single_dir).keys()


def test_fsdp2_resume_continues_exactly(fsdp_runs):
    straight, resumed = fsdp_runs / "straight", fsdp_runs / "resumed"
    # Dropout 0.1: equal only if weights, Adam moments (re-sharded) and every rank's RNG came back.
    assert max_diff(_adapter(resumed), _adapter(straight)) < 1e-6
    assert max_diff(_adapter(resumed), _adapter(fsdp_runs / "plain")) > 1e-4  # dropout did change the run
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")


def _adapter_of_untrained() -> dict:
    model = tiny_llama()
    return {k: v for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("kind, plugin_version, expected", [
    ("DEEPSPEED", 3, "ZeRO stage 1 or 2, got zero_stage=3"),
    ("MEGATRON_LM", None, "Megatron-LM splits layers"),
    ("FSDP", 1, "fsdp_version: 2"),
])
def test_engines_the_loop_cannot_drive_are_refused_by_name(monkeypatch, tmp_path, kind, plugin_version, expected):
    import accelerate.accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    original = accelerate.accelerator.Accelerator.__init__

    def init_as(self, *args, **kwargs):  # what `accelerate launch` with that engine's config would set up
        original(self, *args, **kwargs)
        AcceleratorState().distributed_type = PartialState().distributed_type = DistributedType[kind]
        if kind == "FSDP":
            AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=plugin_version)
        if kind == "DEEPSPEED":
            plugin = DeepSpeedPlugin(zero_stage=plugin_version)
            AcceleratorState().deepspeed_plugins = {"default": plugin}
            plugin.select(_from_accelerator_state=True)

    monkeypatch.setattr(accelerate.accelerator.Accelerator, "__init__", init_as)
    try:
        with pytest.raises(NotImplementedError, match=expected):
            train(tiny_llama(), lm_rows(4), config=TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
