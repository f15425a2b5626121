"""Is a training checkpoint usable? Every field and file is checked before anything is loaded.

A checkpoint folder can be damaged by a crash, a full disk or a hand edit: a truncated or
missing tensor file, NaN weights (which would only surface as a NaN loss, after the model's
forward had run on them), a global_step of -5 or 10^12 (a `checkpoint--2` folder, or a run
that "completes" without training), an lr that is negative or does not follow the schedule,
an RNG state of the wrong size. `check_checkpoint` reads the whole folder (adapter checkpoints
are small) and raises CheckpointError naming the folder, the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

# The files of a checkpoint (see train/checkpoint.py); the state file is written last.
STATE_FILE = "trainer_state.json"
# 2: parameter names follow peft's module tree (`base_model.model.model.layers...`,
# `lora_magnitude_vector.<adapter>.weight`, `modules_to_save`'s `original_module`); version 1
# checkpoints name the same tensors one level shallower and cannot resume.
FORMAT_VERSION = 2
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
RNG_FILE = "rng_state_rank{rank}.safetensors"
# Random-state sizes: torch's CPU generator, Python's Mersenne Twister (624 words + position), numpy's.
TORCH_CPU_STATE_BYTES = int(torch.get_rng_state().numel())
PYTHON_STATE_LEN, NUMPY_KEYS_LEN = 625, 624
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this model/optimizer; the message says why."""


def check_checkpoint(folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Check the state (already parsed from trainer_state.json) and every file of `folder`;
    returns the loaded tensors {"trainable", "optimizer", "rng": {rank: (tensors, meta)}} so that
    loading reads nothing twice."""
    check_state(folder, state)
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
    meta = _read_json(folder / OPTIMIZER_JSON_FILE)
    trainable = _read_tensors(folder / TRAINABLE_FILE, finite=True)
    optimizer = _read_tensors(folder / OPTIMIZER_TENSORS_FILE, finite=True)
    _read_tensors(folder / ADAPTER_FILES[1], finite=True)
    _check_optimizer_json(folder, meta, state)
    rng = {}
    for path in sorted(folder.glob("rng_state_rank*.safetensors")):
        rng[int(path.name[len("rng_state_rank"):-len(".safetensors")])] = _read_rng(path)
    if 0 not in rng:
        raise CheckpointError(f"{folder} is incomplete: {RNG_FILE.format(rank=0)} is missing")
    return {"trainable": trainable, "optimizer": optimizer, "optimizer_json": meta, "rng": rng}


def check_state(folder: Path, state: dict[str, Any]) -> None:
    """The fields of trainer_state.json: step, progress and scheduler counters, learning rates."""
    where = f"{folder / STATE_FILE}"
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format {version!r}, this peftkit reads format {FORMAT_VERSION}: it was "
            f"written by an older peftkit, whose parameter names predate peft's module tree. Its adapter "
            f"still loads (PeftModel.from_pretrained(model, \"{folder}\", is_trainable=True)); start a new run from it"
        )
    step = state.get("global_step")
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"{where}: global_step={step!r} must be an integer >= 0")
    named = _STEP_RE.match(folder.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{where}: global_step={step} does not match the folder's name {folder.name}")
    progress = state.get("progress")
    if not isinstance(progress, dict):
        raise CheckpointError(f"{where}: progress={progress!r} must be a mapping of counters")
    for key in ("global_step", "epoch", "step_in_epoch", "tokens_seen"):
        value = progress.get(key)
        if not _is_int(value) or value < 0:
            raise CheckpointError(f"{where}: progress.{key}={value!r} must be an integer >= 0")
    if progress["global_step"] != step:
        raise CheckpointError(f"{where}: progress.global_step={progress['global_step']} differs from "
                              f"global_step={step}")
    scheduler = state.get("scheduler")
    if not isinstance(scheduler, dict):
        raise CheckpointError(f"{where}: scheduler={scheduler!r} must be a mapping (LambdaLR's state)")
    last = scheduler.get("last_epoch")
    if not _is_int(last) or not 0 <= last <= step:
        raise CheckpointError(f"{where}: scheduler.last_epoch={last!r} must be an integer in [0, global_step={step}]"
                              " (one scheduler step per optimizer step)")
    base_lrs, last_lrs = scheduler.get("base_lrs"), scheduler.get("_last_lr")
    for key, values, low in (("base_lrs", base_lrs, "> 0"), ("_last_lr", last_lrs, ">= 0")):
        if not isinstance(values, list) or not values or not all(_is_rate(v, positive=low == "> 0") for v in values):
            raise CheckpointError(f"{where}: scheduler.{key}={values!r} must be a list of finite numbers {low}")
    if len(base_lrs) != len(last_lrs):
        raise CheckpointError(f"{where}: scheduler has {len(base_lrs)} base_lrs but {len(last_lrs)} _last_lr")
    for i, (base, now) in enumerate(zip(base_lrs, last_lrs)):
        if now > base * (1 + 1e-6):  # warmup and decay only scale the peak rate down
            raise CheckpointError(f"{where}: scheduler._last_lr[{i}]={now} exceeds its peak base_lrs[{i}]={base}")
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise CheckpointError(f"{where}: scaler={scaler!r} must be null or a mapping")


def check_against_run(folder: Path, state: dict[str, Any], total_steps: int, optimizer: torch.optim.Optimizer,
                      config: dict[str, Any]) -> None:
    """The checkpoint fits the run resuming it: its step is within the run, and its peak learning
    rates are those this run's optimizer was built with when the lr settings did not change."""
    step = state["global_step"]
    if step > total_steps:
        raise CheckpointError(f"{folder}: global_step={step} is beyond this run's {total_steps} steps; raise "
                              "max_steps / epochs to continue it, or start a new run in another output_dir")
    base_lrs = state["scheduler"]["base_lrs"]
    groups = optimizer.param_groups
    if len(base_lrs) != len(groups):
        raise CheckpointError(f"{folder}: scheduler.base_lrs has {len(base_lrs)} rates, this run's optimizer has "
                              f"{len(groups)} parameter groups")
    saved = state.get("config", {})
    if all(saved.get(key) == config.get(key) for key in ("lr", "lora_plus_ratio")):
        built = [group.get("initial_lr", group["lr"]) for group in groups]
        for i, (old, new) in enumerate(zip(base_lrs, built)):
            if not math.isclose(old, new, rel_tol=1e-9):
                raise CheckpointError(f"{folder}: scheduler.base_lrs[{i}]={old} differs from {new}, the rate that "
                                      f"lr={config.get('lr')} gives; the checkpoint was altered")


def _check_optimizer_json(folder: Path, meta: Any, state: dict[str, Any]) -> None:
    where = folder / OPTIMIZER_JSON_FILE
    if not isinstance(meta, dict) or not all(k in meta for k in ("param_groups", "param_names", "scalars")):
        raise CheckpointError(f"{where} is damaged: expected param_groups, param_names and scalars")
    groups = meta["param_groups"]
    base_lrs = state["scheduler"]["base_lrs"]
    if not isinstance(groups, list) or len(groups) != len(base_lrs):
        raise CheckpointError(f"{where}: {len(groups) if isinstance(groups, list) else groups!r} param_groups, "
                              f"but the scheduler has {len(base_lrs)} base_lrs")
    for i, group in enumerate(groups):
        lr = group.get("lr") if isinstance(group, dict) else None
        if not _is_rate(lr, positive=False):
            raise CheckpointError(f"{where}: param_groups[{i}].lr={lr!r} must be a finite number >= 0")
        if lr > base_lrs[i] * (1 + 1e-6):
            raise CheckpointError(f"{where}: param_groups[{i}].lr={lr} exceeds the schedule's peak base_lrs[{i}]="
                                  f"{base_lrs[i]}")
        initial = group.get("initial_lr", base_lrs[i])
        if not _is_rate(initial, positive=True) or not math.isclose(initial, base_lrs[i], rel_tol=1e-9):
            raise CheckpointError(f"{where}: param_groups[{i}].initial_lr={initial!r} differs from the scheduler's "
                                  f"base_lrs[{i}]={base_lrs[i]}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is incomplete: {path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None


def _read_tensors(path: Path, finite: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is damaged (truncated or overwritten?): {exc}") from None
    if finite:
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                count = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(f"{path}: tensor {key} holds {count} NaN/Inf values of {tensor.numel()}")
    return tensors


def _read_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta_text = (fh.metadata() or {}).get("rng")
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is damaged (truncated or overwritten?): {exc}") from None
    expected = {"torch_cpu": (torch.uint8, TORCH_CPU_STATE_BYTES), "python": (torch.int64, PYTHON_STATE_LEN),
                "numpy": (torch.int64, NUMPY_KEYS_LEN)}
    for key, (dtype, size) in expected.items():
        tensor = tensors.get(key)
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != (size,):
            found = "missing" if tensor is None else f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            raise CheckpointError(f"{path}: RNG state {key} must be {dtype} of shape ({size},), found {found}")
    for key, words in (("numpy", tensors["numpy"]), ("python", tensors["python"][:-1])):
        if not bool(((words >= 0) & (words < 2**32)).all()):
            raise CheckpointError(f"{path}: RNG state {key} holds values outside 32-bit words")
    try:
        meta = json.loads(meta_text or "")
    except ValueError:
        meta = None
    types = {"python_version": int, "numpy_name": str, "numpy_pos": int, "numpy_has_gauss": int,
             "numpy_gauss": (int, float)}
    if (not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in types.items())
            or not isinstance(meta.get("python_gauss", 0.0), (int, float, type(None)))):
        raise CheckpointError(f"{path}: the RNG metadata is damaged (expected {sorted(types)})")
    if not 0 <= meta["numpy_pos"] <= NUMPY_KEYS_LEN:
        raise CheckpointError(f"{path}: RNG numpy_pos={meta['numpy_pos']} must be in [0, {NUMPY_KEYS_LEN}]")
    position = int(tensors["python"][-1])
    if not 0 <= position <= PYTHON_STATE_LEN - 1:
        raise CheckpointError(f"{path}: RNG state python has position {position}, expected 0..{PYTHON_STATE_LEN - 1}")
    return tensors, meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_rate(value: Any, positive: bool) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 if positive else value >= 0)
