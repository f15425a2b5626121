"""Damaged and tampered training checkpoints: refused with the folder and the field named, before
the model is touched; `resume_from: latest` falls back to the newest usable one; a re-save cut
between its two renames and a prune cut half-way lose nothing."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from _tiny_train import lm_rows, max_diff, tiny_llama, trainable
from safetensors.torch import load_file, save_file

from peftkit.train import CheckpointError, TrainConfig, list_checkpoints, train
from peftkit.train.checkpoint_check import check_checkpoint
from peftkit.train.checkpoint_folders import read_state, remove_stale_temporaries

ROWS = lm_rows(8, seed=3)


def config(out: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), progress=False, log_every=1, seed=7, micro_batch_size=2, lr=5e-3,
                  max_steps=4, save_every=1)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory) -> Path:
    """A 4-step run with a checkpoint after every step, and its final weights beside it."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread), so that resumed runs match it bit for bit
    try:
        train(tiny_llama(dropout=0.1), ROWS, None, config(out), on_step_end=lambda info: info.step == 3)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def out(run_with_checkpoints, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_with_checkpoints, copy)
    return copy


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def nan_tensor(path: Path) -> str:
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return key


# (what is damaged, how, the words the error must contain)
CASES = {
    "truncated trainable": (lambda f: f.joinpath("trainable.safetensors").write_bytes(
        f.joinpath("trainable.safetensors").read_bytes()[:200]), r"trainable.safetensors is damaged \(truncated"),
    "NaN trainable": (lambda f: nan_tensor(f / "trainable.safetensors"),
                      r"trainable.safetensors: tensor .* holds 1 NaN/Inf values"),
    "NaN optimizer moment": (lambda f: nan_tensor(f / "optimizer.safetensors"),
                             r"optimizer.safetensors: tensor state\..* holds 1 NaN/Inf values"),
    "RNG of the wrong shape": (lambda f: save_file(
        {"torch_cpu": torch.zeros(7, dtype=torch.uint8), "python": torch.zeros(625, dtype=torch.int64),
         "numpy": torch.zeros(624, dtype=torch.int64)}, str(f / "rng_state_rank0.safetensors"),
        metadata={"format": "pt", "rng": "{}"}), r"rng_state_rank0.safetensors: RNG state torch_cpu must be "
                                                  r"torch.uint8 of shape \(5056,\), found torch.uint8 of shape \(7,\)"),
    "scheduler state not a counter": (lambda f: edit_json(f / "trainer_state.json", lambda s: s["scheduler"].update(
        last_epoch="3")), r"trainer_state.json: scheduler.last_epoch='3' must be an integer in \[0, global_step=3\]"),
    "NaN lr in the schedule": (lambda f: edit_json(f / "trainer_state.json", lambda s: s["scheduler"].update(
        base_lrs=[float("nan")])), r"scheduler.base_lrs=\[nan\] must be a list of finite numbers > 0"),
    "negative optimizer lr": (lambda f: edit_json(f / "optimizer.json", lambda s: s["param_groups"][0].update(
        lr=-0.1)), r"optimizer.json: param_groups\[0\].lr=-0.1 must be a finite number >= 0"),
    "global_step -5": (lambda f: edit_json(f / "trainer_state.json", lambda s: s.update(global_step=-5)),
                       r"global_step=-5 must be an integer >= 0"),
    "global_step 10^12": (lambda f: edit_json(f / "trainer_state.json", lambda s: s.update(global_step=10**12)),
                          r"global_step=1000000000000 does not match the folder's name checkpoint-3"),
    "only a state file": (lambda f: [p.unlink() for p in f.iterdir() if p.name != "trainer_state.json"],
                          r"checkpoint-3 is incomplete: (optimizer.json|adapter_config.json) is missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_is_refused_by_name_and_latest_falls_back(out, case):
    damage, message = CASES[case]
    folder = out / "checkpoint-3"
    damage(folder)
    before = tree_digest(out)
    # Named explicitly: refused, naming the folder and the field; nothing on disk changes.
    with pytest.raises(CheckpointError, match=message):
        train(tiny_llama(dropout=0.1), ROWS, None, config(out, resume_from=str(folder)))
    assert tree_digest(out) == before
    # `latest`: a warning names the damaged one and the run resumes from checkpoint-2.
    with pytest.warns(UserWarning, match=r"resuming from .*checkpoint-2, the newest usable checkpoint; newer ones "
                                         r"cannot be used:\n  checkpoint-3: "):
        result = train(tiny_llama(dropout=0.1), ROWS, None, config(out, resume_from="latest"))
    assert result.summary["resumed_from"].endswith("checkpoint-2") and result.global_step == 4
    # The damaged step was trained again and saved over: checkpoint-3 is whole again.
    assert [s for s, _ in list_checkpoints(out)] == [2, 3, 4]  # keep_last's default: 3
    check_checkpoint(out / "checkpoint-3", read_state(out / "checkpoint-3"))


def test_a_latest_run_with_its_newer_damaged_checkpoint_equals_the_uninterrupted_run(out, tmp_path):
    nan_tensor(out / "checkpoint-3" / "trainable.safetensors")
    with pytest.warns(UserWarning, match="newest usable"):
        resumed = tiny_llama(dropout=0.1)
        train(resumed, ROWS, None, config(out, resume_from="latest"))
    straight = tiny_llama(dropout=0.1)
    train(straight, ROWS, None, config(tmp_path / "straight"))
    assert max_diff(trainable(resumed), trainable(straight)) == 0


def test_lr_that_differs_from_the_config_is_refused(out):
    edit_json(out / "checkpoint-3" / "trainer_state.json",
              lambda s: s["scheduler"].update(base_lrs=[0.5], _last_lr=[0.25]))
    edit_json(out / "checkpoint-3" / "optimizer.json", lambda s: s["param_groups"][0].update(initial_lr=0.5, lr=0.25))
    with pytest.raises(CheckpointError, match=r"scheduler.base_lrs\[0\]=0.5 differs from 0.005, the rate that "
                                              r"lr=0.005 gives; the checkpoint was altered"):
        train(tiny_llama(dropout=0.1), ROWS, None, config(out, resume_from=str(out / "checkpoint-3")))


def test_a_step_beyond_the_run_is_refused(out):
    folder = out / "checkpoint-3"
    edit_json(folder / "trainer_state.json", lambda s: (s.update(global_step=10**12),
                                                        s["progress"].update(global_step=10**12)))
    far = folder.rename(out / f"checkpoint-{10**12}")
    with pytest.raises(CheckpointError, match=r"global_step=1000000000000 is beyond this run's 4 steps"):
        train(tiny_llama(dropout=0.1), ROWS, None, config(out, resume_from=str(far)))


def test_no_usable_checkpoint_at_all_is_an_error_naming_each(out):
    for step in (1, 2, 3):
        nan_tensor(out / f"checkpoint-{step}" / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*\n  checkpoint-3: .*\n  checkpoint-2: "):
        train(tiny_llama(dropout=0.1), ROWS, None, config(out, resume_from="latest"))


def test_a_nan_checkpoint_never_reaches_the_model(out):
    # Before the checks, the NaN weights reached the chunked loss's probe forward and crashed there.
    nan_tensor(out / "checkpoint-3" / "trainable.safetensors")
    model = tiny_llama(dropout=0.1)
    before = trainable(model)
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        train(model, ROWS, None, config(out, resume_from=str(out / "checkpoint-3")))
    assert max_diff(trainable(model), before) == 0


def test_a_resave_cut_between_its_two_renames_is_restored(out):
    # `_replace_dir` moves checkpoint-3 to .old-PID, then renames the new copy in: a kill in
    # between leaves no checkpoint-3, only the two copies (of a process that no longer runs).
    dead = 2**22 + 12345
    shutil.copytree(out / "checkpoint-3", out / f"checkpoint-3.tmp-{dead}")
    (out / "checkpoint-3").rename(out / f"checkpoint-3.old-{dead}")
    expected = tree_digest(out / f"checkpoint-3.tmp-{dead}")
    with pytest.warns(UserWarning, match=rf"restored checkpoint-3 from checkpoint-3.tmp-{dead}"):
        remove_stale_temporaries(out)
    assert tree_digest(out / "checkpoint-3") == expected
    assert sorted(p.name for p in out.glob("checkpoint-3*")) == ["checkpoint-3"]
    # With only the old copy left (the new one never finished), the old one comes back.
    (out / "checkpoint-3").rename(out / f"checkpoint-3.old-{dead}")
    (out / f"checkpoint-3.tmp-{dead}").mkdir()
    with pytest.warns(UserWarning, match=rf"restored checkpoint-3 from checkpoint-3.old-{dead}"):
        remove_stale_temporaries(out)
    assert tree_digest(out / "checkpoint-3") == expected and not list(out.glob("checkpoint-3.*"))


def test_a_prune_cut_half_way_leaves_no_half_checkpoint(out):
    # Pruning renames a folder before deleting it: a kill mid-delete leaves `.deleting-PID`,
    # which is not a checkpoint and is cleared on the next start.
    dead = 2**22 + 12346
    going = (out / "checkpoint-1").rename(out / f"checkpoint-1.deleting-{dead}")
    (going / "adapter_config.json").unlink()
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert remove_stale_temporaries(out) == [going] and not going.exists()
    result = train(tiny_llama(dropout=0.1), ROWS, None, config(out, resume_from="latest", keep_last=1))
    assert result.global_step == 4 and [s for s, _ in list_checkpoints(out)] == [4]


def test_a_resave_swaps_the_copies_in_one_step(out, monkeypatch):
    # Re-saving an existing step never removes `checkpoint-3` even for an instant: the new copy
    # is swapped in atomically (renameat2), so os.replace must not be used for it.
    import os

    import peftkit.train.checkpoint as ckpt

    new = out / "checkpoint-3.tmp-1"
    shutil.copytree(out / "checkpoint-2", new)
    expected, old = tree_digest(new), tree_digest(out / "checkpoint-3")
    replaced = []
    monkeypatch.setattr(os, "replace", lambda *args: replaced.append(args))
    ckpt._replace_dir(new, out / "checkpoint-3")
    assert replaced == [] and tree_digest(out / "checkpoint-3") == expected and not new.exists()
    assert expected != old
