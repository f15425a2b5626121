"""peftkit.train with the model sharded by FSDP2 over two CPU processes (gloo): the same
adapter, checkpoints and exact resume as one process with the same global batch."""

import json
from pathlib import Path

import pytest
from _engine_runs import COMMON, adapter, assert_matches_one_process, assert_resume_is_exact, launch, standard_runs
from _tiny_train import lm_rows, tiny_llama

from peftkit.train import TrainConfig, train
from peftkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The standard runs (plain, straight with dropout, resumed) and plain in bf16, in one
    torchrun launch."""
    root = tmp_path_factory.mktemp("fsdp")
    bf16 = {"dropout": 0.0, "config": dict(COMMON, output_dir=str(root / "bf16"), micro_batch_size=2, precision="bf16")}
    launch(WORKER, standard_runs(root) + [bf16])
    return root


def test_fsdp2_matches_one_process_with_the_same_global_batch(fsdp_runs, tmp_path):
    # Adapter, checkpoint weights and Adam moments are gathered whole from the shards.
    assert_matches_one_process(fsdp_runs / "plain", tmp_path)


def test_fsdp2_resume_continues_exactly(fsdp_runs):
    assert_resume_is_exact(fsdp_runs)


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
    assert adapter(fsdp_runs / "bf16").keys() == adapter(single_dir).keys()


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
