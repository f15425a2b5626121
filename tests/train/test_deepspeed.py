"""peftkit.train under DeepSpeed ZeRO stage 2 over two CPU processes (gloo): the adapter of one
process with the same global batch, whole-tensor checkpoints, and exact resume."""

import json
from pathlib import Path

import pytest
from _engine_runs import COMMON, assert_matches_one_process, assert_resume_is_exact, launch, standard_runs
from _tiny_train import max_diff
from safetensors.torch import load_file

from peftkit.train import list_checkpoints

WORKER = Path(__file__).with_name("deepspeed_worker.py")
CLIP = 0.5  # low enough that DeepSpeed's clipping acts on these gradient norms (0.52-0.85)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """The standard runs (plain, straight with dropout, resumed) with clipping, and one whose
    loss turns NaN after step 2, in one torchrun launch."""
    root = tmp_path_factory.mktemp("deepspeed")
    nan = {"dropout": 0.0, "nan_after_step": 2,
           "config": dict(COMMON, output_dir=str(root / "nan"), micro_batch_size=2, max_grad_norm=None)}
    launch(WORKER, standard_runs(root, max_grad_norm=CLIP) + [nan])
    return root


def test_zero2_matches_one_process_with_the_same_global_batch(deepspeed_runs, tmp_path):
    # Loss scaling (DeepSpeed divides by its accumulation steps), the engine's clipping and
    # the gradient norm it reports agree with the loop's own single-process step, and the
    # optimizer state is gathered from ZeRO's partitions into the single-process layout.
    single_steps = assert_matches_one_process(deepspeed_runs / "plain", tmp_path, max_grad_norm=CLIP)
    assert any(r["grad_norm"] > CLIP for r in single_steps)  # clipping did act


def test_zero2_resume_continues_exactly(deepspeed_runs):
    # Also needs DeepSpeed's fp32 master weights and Adam step restored (each checked by removal).
    assert_resume_is_exact(deepspeed_runs)


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
