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
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..atomic_files import exchange_paths, raise_if_disk_full
from ..checkpoint.sharded import gather_full, shard_like
from . import deepspeed_zero
from .checkpoint_check import (FORMAT_VERSION, OPTIMIZER_JSON_FILE, OPTIMIZER_TENSORS_FILE, RNG_FILE, STATE_FILE,
                               TRAINABLE_FILE, CheckpointError, check_against_run, check_checkpoint)
from .checkpoint_folders import (find_latest_checkpoint, list_checkpoints, prune_checkpoints, read_state,
                                 remove_stale_temporaries, resolve_resume_path)
from .config import config_changes

__all__ = ["CheckpointError", "STATE_FILE", "TRAINABLE_FILE", "OPTIMIZER_TENSORS_FILE", "OPTIMIZER_JSON_FILE",
           "RNG_FILE", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "describe_changes",
           "check_against_run", "find_latest_checkpoint", "list_checkpoints", "prune_checkpoints",
           "read_state", "remove_stale_temporaries", "resolve_resume_path"]


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
                prune_checkpoints(root, keep_last, up_to_step=step)
    except BaseException as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            # Pruning runs only after a complete save, so a failed one has deleted nothing.
            last = find_latest_checkpoint(root) or "none (no checkpoint yet)"
            raise_if_disk_full(exc, final.name, str(root), _checkpoint_bytes(model, optimizer),
                               f"nothing was deleted; the last complete checkpoint is {last}. Free some space, "
                               "then resume with resume_from='latest'")
        raise
    accelerator.wait_for_everyone()
    return final


def _checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About what one checkpoint takes: the trainable tensors twice (adapter file and exact
    copy) plus the optimizer's tensors."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(v.numel() * v.element_size() for per in optimizer.state.values() for v in per.values()
                  if isinstance(v, torch.Tensor))
    return 2 * params + moments


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
    seen: set[int] = set()
    for index, per_param in sd["state"].items():
        for key, value in _flat_state(per_param):
            if isinstance(value, torch.Tensor):
                value = gather_full(value.detach()).cpu().contiguous()
                if value.data_ptr() in seen:  # one tensor shared by several params (bitsandbytes' qmaps)
                    value = value.clone()
                seen.add(value.data_ptr())
                tensors[f"state.{index}.{key}"] = value
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
    if not final.exists():
        os.replace(tmp, final)
    elif exchange_paths(tmp, final):  # re-saving a step (e.g. a stop right after resuming): one atomic swap
        shutil.rmtree(tmp, ignore_errors=True)  # now the old copy; a kill here leaves a spare, not a gap
    else:  # no atomic swap here: two renames, and checkpoint_folders.remove_stale_temporaries
        old = final.with_name(f"{final.name}.old-{os.getpid()}")  # restores a kill between them
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


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
    state = read_state(folder)
    if state is None:
        raise CheckpointError(f"{folder} is not a complete checkpoint: {STATE_FILE} is missing")
    loaded = check_checkpoint(folder, state)  # every file and field, before the model is touched
    deepspeed = deepspeed_zero.is_deepspeed(accelerator)
    _load_trainable(folder / TRAINABLE_FILE, loaded["trainable"], model, deepspeed)
    _load_optimizer(folder, loaded["optimizer_json"], loaded["optimizer"], optimizer, model, deepspeed)
    rng = loaded["rng"].get(accelerator.process_index)
    if rng is None:
        rng = loaded["rng"][0]
        warnings.warn(
            f"{folder} has no RNG state for process {accelerator.process_index} (it was saved by "
            f"{state.get('world_size')} process(es)); using process 0's, so dropout masks will differ "
            "from an uninterrupted run",
            stacklevel=2,
        )
    _load_rng(*rng)
    return state


def _load_trainable(path: Path, saved: dict[str, torch.Tensor], model: torch.nn.Module, deepspeed: bool) -> None:
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


def _load_optimizer(folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, model: torch.nn.Module, deepspeed: bool) -> None:
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
        deepspeed_zero.restore_moments(model, optimizer, tensors)
        for group, saved in zip(optimizer.param_groups, groups):  # lr, weight decay, betas, ...
            group.update({key: value for key, value in saved.items() if key != "params"})
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, index, name = key.split(".", 2)
        like = params[int(index)]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.is_floating_point() and value.shape == like.shape:
                value = shard_like(value, like)  # moments are shaped (and sharded) as their param
            else:  # quantized moments (8-bit optimizers) keep their own dtype and shape
                value = value.to(like.device)
        *outer, leaf = name.split("/")
        per_param = state.setdefault(int(index), {})
        for part in outer:
            per_param = per_param.setdefault(part, {})
        per_param[leaf] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _flat_state(per_param: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A parameter's optimizer state as (key, value) pairs; nested dicts (bitsandbytes keeps its
    8-bit moments under one) become "outer/inner" keys."""
    pairs = []
    for key, value in per_param.items():
        if isinstance(value, dict):
            pairs += _flat_state(value, f"{prefix}{key}/")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _load_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    random.setstate((meta["python_version"], tuple(tensors["python"].tolist()), meta["python_gauss"]))
    np.random.set_state(
        (meta["numpy_name"], tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
         meta["numpy_has_gauss"], meta["numpy_gauss"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
