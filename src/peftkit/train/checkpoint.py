"""Training checkpoints: save and restore the full training state, atomically.

`output_dir/checkpoint-{step}/` holds
  adapter_config.json, adapter_model.safetensors  the adapter, PEFT format (model.save_pretrained)
  trainable.safetensors                           every trainable parameter by name, for exact resume
  optimizer.safetensors + optimizer.json          optimizer tensors / param groups and param names
  rng_state_rank{r}.safetensors                   python, numpy, torch CPU (+CUDA) RNG of process r
  trainer_state.json                              step, data position, scheduler, scaler, fingerprints

Tensors are whole: under FSDP2 each process holds a shard, which saving gathers (every
process takes part) and loading cuts back out, so a checkpoint does not depend on how many
processes wrote it. Only safetensors and JSON are written or read: nothing is unpickled. A checkpoint is built in
`checkpoint-{step}.tmp-{pid}` and renamed into place, and `trainer_state.json` is written
last, so a folder named `checkpoint-{step}` with that file is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.sharded import gather_full, shard_like
from . import deepspeed_zero
from .config import config_changes

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
RNG_FILE = "rng_state_rank{rank}.safetensors"
# 2: parameter names follow peft's module tree (`base_model.model.model.layers...`,
# `lora_magnitude_vector.<adapter>.weight`, `modules_to_save`'s `original_module`); version 1
# checkpoints name the same tensors one level shallower and cannot resume.
FORMAT_VERSION = 2

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^checkpoint-\d+\.(?:tmp|old)-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this model/optimizer; the message says why."""


# ---- finding checkpoints ---------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first.

    A damaged one (its state file unreadable) is left out with a warning naming the file: the
    older checkpoints can still be resumed, pruned or refused by a fresh run, so stopping
    for it would help nobody, but resuming from an older step must not happen unannounced.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if not (match and child.is_dir()):
            continue
        try:
            state = _read_state(child)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; leaving {child.name} out of the checkpoints of {root}", stacklevel=2)
            continue
        if state is not None:
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume_path(resume_from: str, output_dir: str | os.PathLike) -> Path | None:
    """Checkpoint folder for `resume_from` ("latest" may find none: None, a fresh start)."""
    if resume_from == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume_from)
    try:
        state, problem = _read_state(path), None
    except CheckpointError as exc:
        state, problem = None, str(exc)
    if state is None:
        latest = find_latest_checkpoint(output_dir)
        hint = f"; the latest complete checkpoint in {output_dir} is {latest}" if latest else ""
        found = problem or f"expected a folder containing {STATE_FILE}"
        raise CheckpointError(
            f"resume_from={resume_from!r} is not a complete peftkit training checkpoint ({found}){hint}"
        )
    return path


def _read_state(path: Path) -> dict[str, Any] | None:
    """The saved trainer state; None when there is no state file (not a checkpoint: the file is
    written last, so a folder without it is incomplete). A state file that is there but cannot
    be read or parsed raises CheckpointError naming it: the checkpoint is damaged, not absent."""
    file = path / STATE_FILE
    try:
        text = file.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc})") from None
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{file} is damaged: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{file} is damaged: no global_step in it")
    return state


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written checkpoint folders left by processes that no longer run."""
    root = Path(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        match = _TMP_RE.match(child.name)
        if match and child.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- saving ----------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    output_dir: str | os.PathLike,
    keep_last: int | None,
    main_pid: int,
) -> Path:
    """Write `checkpoint-{state['global_step']}` atomically; return its path.

    Must be called by every process: each writes its own RNG file, the main process writes
    the rest. `model` is the unwrapped model; `main_pid` is the main process's pid (the same
    on all processes) naming the temporary folder.
    """
    root = Path(output_dir)
    step = int(state["global_step"])
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp-{main_pid}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _save_rng(tmp / RNG_FILE.format(rank=accelerator.process_index))
        # Gathering sharded tensors is collective: every process collects, the main one writes.
        model.save_pretrained(str(tmp), is_main_process=main)
        trainable = _trainable_tensors(model)
        optimizer_state = _optimizer_state(optimizer, model, deepspeed_zero.is_deepspeed(accelerator))
        accelerator.wait_for_everyone()
        if main:
            save_file(trainable, str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
            _save_optimizer(optimizer_state, tmp)
            full_state = dict(state, format_version=FORMAT_VERSION, world_size=accelerator.num_processes)
            _write_json(tmp / STATE_FILE, full_state)  # last: its presence marks completeness
            _fsync_tree(tmp)
            _replace_dir(tmp, final)
            if keep_last is not None:
                prune_checkpoints(root, keep_last)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints; return the deleted paths."""
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: gather_full(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, deepspeed: bool) -> dict[str, Any]:
    """Whole optimizer tensors by "state.{index}.{key}", plus the JSON-able rest."""
    if deepspeed:
        tensors, names = deepspeed_zero.gather_moments(model, optimizer)
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        return {"tensors": tensors, "param_groups": groups, "param_names": names, "scalars": {}}
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = gather_full(value.detach()).cpu().contiguous()
            else:
                scalars[f"state.{index}.{key}"] = value
    return {"tensors": tensors, "param_groups": sd["param_groups"],
            "param_names": _optimizer_param_names(optimizer, model), "scalars": scalars}


def _save_optimizer(state: dict[str, Any], folder: Path) -> None:
    save_file(state["tensors"], str(folder / OPTIMIZER_TENSORS_FILE), metadata={"format": "pt"})
    _write_json(folder / OPTIMIZER_JSON_FILE,
                {key: state[key] for key in ("param_groups", "param_names", "scalars")})


def _optimizer_param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "<not in model>") for group in optimizer.param_groups for p in group["params"]]


def _save_rng(path: Path) -> None:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"python_version": py_version, "python_gauss": py_gauss, "numpy_name": np_name,
            "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    save_file(tensors, str(path), metadata={"format": "pt", "rng": json.dumps(meta)})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _fsync_tree(folder: Path) -> None:
    # Without this a power loss after the rename could leave the folder with empty files.
    for child in folder.rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():  # re-saving a step (e.g. a stop right after resuming): move the old aside
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ---- loading ---------------------------------------------------------------------------


def describe_changes(saved: dict[str, Any], config: dict[str, Any], data_fingerprint: str, num_rows: int,
                     world_size: int) -> list[str]:
    """What differs between a checkpoint's run and the run resuming it, one line per change."""
    changes = config_changes(saved.get("config", {}), config)
    if saved.get("data_fingerprint") != data_fingerprint:
        changes.append(
            f"train data: fingerprint {saved.get('data_fingerprint')} -> {data_fingerprint}, "
            f"rows {saved.get('num_rows')} -> {num_rows}"
        )
    if saved.get("world_size") not in (None, world_size):
        changes.append(f"number of processes: {saved.get('world_size')} -> {world_size} (the global batch changes)")
    return changes


def load_checkpoint(
    path: str | os.PathLike,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer and this process's RNG; return the saved state.

    `model` is the unwrapped model. The scheduler and grad-scaler states are in the
    returned dict (`scheduler`, `scaler`) for the caller to apply.
    """
    folder = Path(path)
    state = _read_state(folder)
    if state is None:
        raise CheckpointError(f"{folder} is not a complete checkpoint: {STATE_FILE} is missing")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format {version!r}, this peftkit reads format {FORMAT_VERSION}: it was "
            f"written by an older peftkit, whose parameter names predate peft's module tree. Its adapter "
            f"still loads (PeftModel.from_pretrained(model, \"{folder}\", is_trainable=True)); start a new run from it"
        )
    deepspeed = deepspeed_zero.is_deepspeed(accelerator)
    _load_trainable(folder / TRAINABLE_FILE, model, deepspeed)
    _load_optimizer(folder, optimizer, model, deepspeed)
    rng_file = folder / RNG_FILE.format(rank=accelerator.process_index)
    if not rng_file.exists():
        rng_file = folder / RNG_FILE.format(rank=0)
        warnings.warn(
            f"{folder} has no RNG state for process {accelerator.process_index} (it was saved by "
            f"{state.get('world_size')} process(es)); using process 0's, so dropout masks will differ "
            "from an uninterrupted run",
            stacklevel=2,
        )
    _load_rng(rng_file)
    return state


def _load_trainable(path: Path, model: torch.nn.Module, deepspeed: bool = False) -> None:
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    problems = []
    if missing:
        problems.append(f"trainable parameters missing from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"checkpoint parameters that are not trainable in this model: {unexpected}")
    for name in sorted(set(params) & set(saved)):
        if tuple(params[name].shape) != tuple(saved[name].shape):
            problems.append(
                f"{name}: model shape {tuple(params[name].shape)}, checkpoint shape {tuple(saved[name].shape)}"
            )
    if problems:
        raise CheckpointError(f"{path} does not match the model's trainable parameters:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(shard_like(saved[name], param))
    if deepspeed:
        deepspeed_zero.set_master_weights(model, saved)


def _load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                    deepspeed: bool = False) -> None:
    meta = json.loads((folder / OPTIMIZER_JSON_FILE).read_text())
    current = ([n for n, _ in deepspeed_zero.param_order(model, optimizer)] if deepspeed
               else _optimizer_param_names(optimizer, model))
    if meta["param_names"] != current:
        raise CheckpointError(
            f"the optimizer in {folder} was built over different parameters: saved {meta['param_names']}, "
            f"now {current}"
        )
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:  # JSON has no tuples; Adam-style optimizers expect one
            group["betas"] = tuple(group["betas"])
    if deepspeed:  # the engine's partitioned state takes whole tensors through its own API
        deepspeed_zero.restore_moments(model, optimizer, load_file(str(folder / OPTIMIZER_TENSORS_FILE)))
        for group, saved in zip(optimizer.param_groups, groups):  # lr, weight decay, betas, ...
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(load_file(str(folder / OPTIMIZER_TENSORS_FILE)).items()) + list(meta["scalars"].items()):
        _, index, name = key.split(".", 2)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            value = shard_like(value, params[int(index)])  # moments are shaped (and sharded) as their param
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rng"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    random.setstate((meta["python_version"], tuple(tensors["python"].tolist()), meta["python_gauss"]))
    np.random.set_state(
        (meta["numpy_name"], tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
         meta["numpy_has_gauss"], meta["numpy_gauss"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
