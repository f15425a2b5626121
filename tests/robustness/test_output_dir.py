"""One run per output folder, and a full disk: a second run into a busy folder is refused; a
lock left by a dead process is taken over; a full disk while checkpointing names the size,
the free space and the last checkpoint, and deletes nothing."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
from _tiny_train import lm_rows, tiny_llama

import peftkit.train.checkpoint as ckpt
from peftkit.atomic_files import DiskFullError
from peftkit.train import TrainConfig, list_checkpoints, train
from peftkit.train.checkpoint_check import check_checkpoint
from peftkit.train.checkpoint_folders import read_state
from peftkit.train import run_lock
from peftkit.train.run_lock import LOCK_FILE, OutputDirInUse, hold_output_dir

ROWS = lm_rows(8, seed=5)


def config(out, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), progress=False, log_every=1, seed=7, micro_batch_size=2, lr=5e-3,
                  max_steps=3, save_every=1)
    values.update(overrides)
    return TrainConfig(**values)


def tree(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def other_process_holding(tmp_path):
    """A second process that holds the output folder's lock until told to stop."""
    # run_lock.py needs only the standard library: loaded alone, the other process starts at once.
    code = "\n".join(["import importlib.util, sys",
                      f"spec = importlib.util.spec_from_file_location('run_lock', {run_lock.__file__!r})",
                      "run_lock = importlib.util.module_from_spec(spec)", "spec.loader.exec_module(run_lock)",
                      f"with run_lock.hold_output_dir({str(tmp_path / 'run')!r}):",
                      "    print('locked', flush=True)", "    sys.stdin.read()"])
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, other_process_holding):
    out = tmp_path / "run"
    with pytest.raises(OutputDirInUse, match=rf"output_dir '{out}' is in use by another peftkit run \(pid "
                                             rf"{other_process_holding.pid} on host {socket.gethostname()}, started "
                                             r".*\); wait for it to finish or choose another output_dir"):
        train(tiny_llama(), ROWS, None, config(out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of this run was written


def test_the_cli_refuses_a_busy_folder_before_loading_anything(tmp_path, other_process_holding, capsys):
    from cli_helpers import causal_config

    from peftkit.cli.main import main as peftkit_main

    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "model")  # config only: no weights
    path = causal_config(tmp_path, str(tmp_path / "model"))
    code = peftkit_main(["train", path])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith(f"error: output_dir '{tmp_path / 'run'}' is in use by another peftkit run"), err


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "proc_start": 1,
                                             "started": "earlier"}))
    with pytest.warns(UserWarning, match=rf"taking over the lock of {out}: its owner \(pid {pid} on host "
                                         rf"{socket.gethostname()}, started earlier\) is no longer running"):
        result = train(tiny_llama(), ROWS, None, config(out))
    assert result.global_step == 3 and not (out / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(OutputDirInUse, match=rf"holds a lock of another host \(pid 1 on host elsewhere, started "
                                             rf"earlier\); if that run is over, delete {out / LOCK_FILE}"):
        with hold_output_dir(out):
            pass
    assert json.loads((out / LOCK_FILE).read_text())["host"] == "elsewhere"  # left as it was


def test_the_same_process_may_re_enter_its_lock(tmp_path):
    with hold_output_dir(tmp_path), hold_output_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_failed_lock_write_gives_the_lock_up(tmp_path, monkeypatch):
    """Disk full while writing the owner: the error reaches the caller and a retry (space freed)
    gets the lock, instead of finding it held by its own process forever."""
    real = run_lock._write_owner

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_lock, "_write_owner", full)
    with pytest.raises(OSError, match="No space left"):
        with hold_output_dir(tmp_path):
            pass
    monkeypatch.setattr(run_lock, "_write_owner", real)
    with hold_output_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()


def test_disk_full_while_checkpointing_is_reported_and_deletes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ckpt.save_file
    writes = []

    def disk_fills_at_step_3(tensors, path, metadata=None):
        writes.append(path)
        if ".tmp-" in path and "checkpoint-3" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", disk_fills_at_step_3)
    with pytest.raises(DiskFullError) as caught:
        train(tiny_llama(), ROWS, None, config(out, keep_last=1))
    message = str(caught.value)
    assert message.startswith(f"disk full while writing checkpoint-3 in {out}: it needs about ")
    assert " MB are free there; nothing was deleted; the last complete checkpoint is " \
           f"{out / 'checkpoint-2'}. Free some space, then resume with resume_from='latest'" in message
    assert caught.value.errno == errno.ENOSPC
    assert [s for s, _ in list_checkpoints(out)] == [2]  # keep_last=1 pruned 1 after 2 was saved, nothing more
    assert not list(out.glob("checkpoint-3*"))  # the half-written folder is gone
    check_checkpoint(out / "checkpoint-2", read_state(out / "checkpoint-2"))  # intact
    monkeypatch.setattr(ckpt, "save_file", real)
    result = train(tiny_llama(), ROWS, None, config(out, keep_last=1, resume_from="latest"))
    assert result.summary["resumed_from"].endswith("checkpoint-2") and result.global_step == 3


def _safetensors_disk_full():
    from safetensors import SafetensorError

    # What safetensors' Rust writer raises on a full disk (its message carries the OS error).
    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')


@pytest.mark.parametrize("error", [lambda: OSError(errno.ENOSPC, "No space left on device"), _safetensors_disk_full])
def test_disk_full_when_saving_the_adapter_keeps_the_previous_file(tmp_path, monkeypatch, error):
    import safetensors.torch

    model = tiny_llama()
    model.save_pretrained(str(tmp_path))
    before = tree(tmp_path)

    def full(*args, **kwargs):
        raise error()

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFullError, match=rf"disk full while writing adapter_model.safetensors in {tmp_path}: it "
                                            r"needs about 0.\d MB and [0-9.]+ MB are free there; the previous "
                                            r"adapter_model.safetensors is unchanged"):
        model.save_pretrained(str(tmp_path))
    assert tree(tmp_path) == before and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
