"""Two CPU processes (gloo) under torchrun give the one-process result with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from _tiny_train import lm_rows, max_diff, tiny_llama, trainable
from safetensors.torch import load_file

from peftkit.train import TrainConfig, list_checkpoints, train
from peftkit.train.logging import read_metrics

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # 13 rows, 8 per step: the second window is partial, so one process runs a filler micro-batch.
    common = dict(max_steps=3, grad_accum=2, seed=3, lr=1e-2, save_every=2, eval_every=3, log_every=1, progress=False)
    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(ddp_out), json.dumps(dict(common, output_dir=str(ddp_out), micro_batch_size=2))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
        raise AssertionError("torchrun failed:\n" + "\n".join(errors[:20]) + "\n--- stderr tail ---\n"
                             + proc.stderr[-4000:])

    rank0, rank1 = (load_file(str(ddp_out / f"rank{r}.safetensors")) for r in (0, 1))
    assert max_diff(rank0, rank1) == 0

    single = tiny_llama()
    result = train(single, lm_rows(13, seed=11), lm_rows(5, seed=12),
                   TrainConfig(**common, output_dir=str(tmp_path / "single"), micro_batch_size=4))
    assert max_diff(rank0, trainable(single)) < 1e-5
    assert max_diff(rank0, trainable(tiny_llama())) > 1e-3  # it did train

    ddp_result = json.loads((ddp_out / "result.json").read_text())
    assert ddp_result["summary"]["num_processes"] == 2
    assert abs(ddp_result["eval"]["eval_loss"] - result.eval_metrics["eval_loss"]) < 1e-5
    assert ddp_result["summary"]["tokens"] == result.summary["tokens"]
    # Adam hides a wrong gradient scale in the weights; the logged gradient norm does not.
    ddp_steps = [r for r in read_metrics(ddp_out / "metrics.jsonl") if "loss" in r]
    single_steps = [r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if "loss" in r]
    assert len(ddp_steps) == len(single_steps) == 3
    for a, b in zip(ddp_steps, single_steps):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-5

    # Checkpoints written once, by the main process, with every process's RNG state.
    assert [step for step, _ in list_checkpoints(ddp_out)] == [2, 3]
    assert not [p for p in ddp_out.iterdir() if ".tmp-" in p.name]
    for _, folder in list_checkpoints(ddp_out):
        assert (folder / "rng_state_rank0.safetensors").exists() and (folder / "rng_state_rank1.safetensors").exists()
        assert json.loads((folder / "trainer_state.json").read_text())["world_size"] == 2
    ddp_ckpt = load_file(str(ddp_out / "checkpoint-2" / "trainable.safetensors"))
    single_ckpt = load_file(str(tmp_path / "single" / "checkpoint-2" / "trainable.safetensors"))
    assert max_diff(ddp_ckpt, single_ckpt) < 1e-5


def test_a_process_state_that_lost_the_launch_is_an_error_not_a_lonely_run(monkeypatch, tmp_path):
    # A PartialState made without cpu=True on a CPU-only torchrun job sees one process; the
    # loop would then train each rank alone. It refuses instead, naming both counts.
    import pytest
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState()  # single process, as such code would leave it
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* has 1"):
            train(tiny_llama(), lm_rows(4), config=TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
