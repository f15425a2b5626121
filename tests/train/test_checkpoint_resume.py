"""Checkpoints: exact resume, atomic saves, pruning, NaN and signal stops."""

import json
import os
import signal

import pytest
import torch
from _tiny_train import lm_rows, max_diff, tiny_llama, trainable
from safetensors.torch import load_file

import peftkit.train.checkpoint as ckpt
from peftkit.train import NonFiniteLossError, TrainConfig, find_latest_checkpoint, list_checkpoints, train
from peftkit.train.logging import read_metrics


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path), progress=False, log_every=1, seed=7, micro_batch_size=2, lr=5e-3)
    values.update(overrides)
    return TrainConfig(**values)


def _stop_at(step):
    return lambda info: info.step == step


def test_resume_continues_exactly(tmp_path):
    # 10 rows / micro 2 = 5 steps per epoch: the run crosses an epoch (a new shuffle) after the
    # stop; LoRA dropout makes the RNG matter.
    rows = lm_rows(10, seed=4)
    straight = tiny_llama(dropout=0.2)
    train(straight, rows, None, config(tmp_path / "a", max_steps=8, save_every=0))

    first = tiny_llama(dropout=0.2)
    result = train(first, rows, None, config(tmp_path / "b", max_steps=8, save_every=0), on_step_end=_stop_at(3))
    assert result.stopped_reason == "callback" and result.global_step == 3
    assert result.last_checkpoint == tmp_path / "b" / "checkpoint-3"
    assert max_diff(trainable(first), trainable(straight)) > 1e-4  # really stopped half-way

    resumed = tiny_llama(dropout=0.2, r=4)
    with torch.no_grad():  # fresh adapter weights: everything must come from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    result = train(resumed, rows, None, config(tmp_path / "b", max_steps=8, save_every=0, resume_from="latest"))
    assert result.global_step == 8 and result.summary["resumed_from"].endswith("checkpoint-3")
    assert max_diff(trainable(resumed), trainable(straight)) < 1e-6

    # The metrics file reads as one run with the same losses.
    def losses(folder):
        return [(r["step"], r["loss"]) for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]

    assert [s for s, _ in losses(tmp_path / "b")] == list(range(1, 9))
    assert max(abs(a[1] - b[1]) for a, b in zip(losses(tmp_path / "a"), losses(tmp_path / "b"))) < 1e-6


def test_resume_with_a_different_config_or_data_warns_what_changed(tmp_path):
    rows = lm_rows(8, seed=1)
    train(tiny_llama(), rows, None, config(tmp_path, max_steps=4, save_every=2), on_step_end=_stop_at(2))
    changed_rows = lm_rows(8, seed=2)
    with pytest.warns(UserWarning) as caught:
        train(tiny_llama(), changed_rows, None, config(tmp_path, max_steps=4, save_every=2, lr=1e-3,
                                                       resume_from=str(tmp_path / "checkpoint-2")))
    text = "\n".join(str(w.message) for w in caught)
    assert "lr: 0.005 -> 0.001" in text and "train data: fingerprint" in text
    with pytest.raises(ckpt.CheckpointError, match="not a complete peftkit training checkpoint"):
        train(tiny_llama(), rows, None, config(tmp_path, max_steps=4, resume_from=str(tmp_path / "nowhere")))


def test_checkpoint_contents_are_safetensors_and_json(tmp_path):
    model = tiny_llama()
    train(model, lm_rows(8), None, config(tmp_path, max_steps=2, save_every=2, micro_batch_size=4))
    folder = tmp_path / "checkpoint-2"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([
        "adapter_config.json", "adapter_model.safetensors", "optimizer.json", "optimizer.safetensors",
        "rng_state_rank0.safetensors", "trainable.safetensors", "trainer_state.json",
    ])
    saved = load_file(str(folder / "trainable.safetensors"))
    assert max_diff(saved, trainable(model)) == 0
    optimizer_tensors = load_file(str(folder / "optimizer.safetensors"))
    assert len([k for k in optimizer_tensors if k.endswith("exp_avg")]) == len(saved)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["progress"]["step_in_epoch"] == 0 and state["progress"]["epoch"] == 1
    assert state["sampler_seed"] == 7 and len(state["data_fingerprint"]) == 16 and state["config"]["lr"] == 5e-3
    assert state["config_fingerprint"] == config(tmp_path / "elsewhere", max_steps=2, save_every=2,
                                                 micro_batch_size=4).fingerprint()


def test_a_checkpoint_of_an_older_format_is_refused_with_what_to_do(tmp_path):
    # Format 1 named parameters one level shallower than peft's tree: resuming would fail deep
    # inside the loader with a list of every tensor.
    train(tiny_llama(), lm_rows(8), None, config(tmp_path, max_steps=2, save_every=2, micro_batch_size=4))
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["format_version"] == ckpt.FORMAT_VERSION == 2
    state_file.write_text(json.dumps(dict(state, format_version=1)))
    with pytest.raises(ckpt.CheckpointError, match=r"format 1, this peftkit reads format 2.*from_pretrained"):
        train(tiny_llama(), lm_rows(8), None, config(tmp_path, max_steps=4, micro_batch_size=4,
                                                     resume_from=str(tmp_path / "checkpoint-2")))


def test_crash_while_saving_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    real = ckpt._save_optimizer
    calls = []

    def fail_second_time(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args)

    monkeypatch.setattr(ckpt, "_save_optimizer", fail_second_time)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_llama(), lm_rows(8), None, config(tmp_path, max_steps=4, save_every=2))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"

    # A killed process leaves its temporary folder; an incomplete folder is never "latest".
    (tmp_path / "checkpoint-9.tmp-999999999").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # no state file: not a checkpoint (the file is written last)
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "trainer_state.json").write_text('{"global_st')
    # A damaged one is not "latest" either, but is named: resuming from an older step is announced.
    with pytest.warns(UserWarning, match=r"checkpoint-7/trainer_state.json is damaged: not valid JSON"):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-7/trainer_state.json is damaged: not valid JSON"):
        ckpt.resolve_resume_path(str(tmp_path / "checkpoint-7"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-7/trainer_state.json is damaged"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-7", None, None, None)
    monkeypatch.setattr(ckpt, "_save_optimizer", real)
    with pytest.warns(UserWarning, match="leaving checkpoint-7 out of the checkpoints"):
        result = train(tiny_llama(), lm_rows(8), None,
                       config(tmp_path, max_steps=4, save_every=2, resume_from="latest"))
    assert result.global_step == 4 and not (tmp_path / "checkpoint-9.tmp-999999999").exists()
    (tmp_path / "checkpoint-7" / "trainer_state.json").write_text('{"step": 7}')
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-7/trainer_state.json is damaged: no global_step"):
        ckpt.resolve_resume_path(str(tmp_path / "checkpoint-7"), tmp_path)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(tiny_llama(), lm_rows(8), None, config(tmp_path, max_steps=5, save_every=1, keep_last=2))
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llama()
    poisoned = []

    def poison(module, args, output):  # the final norm feeds the loss on every loss path
        return output * float("nan") if poisoned else output

    def after_step(info):
        if info.step == 2:
            poisoned.append(True)  # so the forward of step 3 yields NaN

    model.get_base_model().model.norm.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="loss is nan at optimizer step 3") as err:
        train(model, lm_rows(8), None, config(tmp_path, max_steps=6, save_every=1), on_step_end=after_step)
    assert err.value.last_checkpoint == tmp_path / "checkpoint-2"
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    # No update was applied with the NaN gradients.
    assert max_diff(trainable(model), load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))) == 0


def test_sigterm_saves_a_checkpoint_and_returns_cleanly(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)

    def send_sigterm(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(tiny_llama(), lm_rows(16), None, config(tmp_path, max_steps=10, save_every=0),
                   on_step_end=send_sigterm)
    assert result.stopped_reason == "signal" and result.global_step == 2
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_reason"] == "signal"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_latest_without_checkpoints_starts_fresh_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    rows = lm_rows(8)
    fresh = train(tiny_llama(), rows, None, config(tmp_path, max_steps=2, save_every=2, resume_from="latest"))
    assert fresh.global_step == 2 and fresh.summary["resumed_from"] is None
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run \(checkpoint-2\)"):
        train(tiny_llama(), rows, None, config(tmp_path, max_steps=2, save_every=2))
