"""`transformers.Trainer` whose checkpoints hold only the adapter, in PEFT's on-disk format.

The stock Trainer only recognises the `peft` library's PeftModel: given a peftkit model it
writes the whole base model into every checkpoint and, on resume, loads that full state dict.
This subclass overrides the three hooks that decide what a checkpoint holds
(`_save`, `_load_from_checkpoint`, `_load_best_model`): a checkpoint folder then holds
`adapter_config.json` + `adapter_model.safetensors` (non-default adapters in sub-folders,
as `PeftModel.save_pretrained` lays them out) next to the optimizer, scheduler, RNG and
trainer state that Trainer saves as usual. Loading copies the weights into the existing
adapter tensors in place, so the optimizer (whose state is keyed by those tensors) stays valid.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn
import transformers
from transformers.trainer_pt_utils import LabelSmoother

from ..checkpoint import SAFETENSORS_NAME, write_safetensors
from ..checkpoint.adapter_check import read_checked_adapter
from ..checkpoint.io import adapter_folder
from ..lm_head_split import is_causal_lm
from ..model import PeftModel

# Trainer's name for the pickled TrainingArguments it writes next to every saved model.
TRAINING_ARGS_NAME = "training_args.bin"


class CheckpointMismatchError(ValueError):
    """A checkpoint's adapter does not fit the model being trained (missing or extra tensors)."""


class AdapterCheckpoints:
    """Mixin for a `transformers.Trainer` subclass (also TRL's trainers) training a peftkit
    `PeftModel`: checkpoints and `save_model()` write only the adapter (PEFT format);
    `resume_from_checkpoint` and `load_best_model_at_end` load it in place."""

    def _require_unsharded(self) -> None:
        _require_peft_model(self.model)
        if self.is_fsdp_enabled:
            raise ValueError(
                f"peftkit.integrations.{type(self).__name__} does not support FSDP: it saves and loads the adapter "
                "of the local, unsharded model. Use DDP or DeepSpeed ZeRO-1/2, or transformers.Trainer "
                "(full-model checkpoints)"
            )

    def _peft_model(self, model: nn.Module | None = None) -> PeftModel:
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        _require_peft_model(unwrapped)
        return unwrapped

    # --- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter(s), tokenizer/processor and training arguments to `output_dir`.

        `state_dict` (full-model keys) is what Trainer gathered under DeepSpeed; its tensors
        are used instead of the local ones.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._peft_model()
        if state_dict is None:
            model.save_pretrained(output_dir)
        else:
            _save_gathered(model, output_dir, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # --- loading --------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: copy the checkpoint's adapter into the model in place. A checkpoint that holds
        full-model weights (written by the stock Trainer) is loaded by Trainer itself."""
        peft_model = self._peft_model(model)
        if not has_adapter_files(resume_from_checkpoint, peft_model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters_in_place(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        peft_model = self._peft_model()
        if self.is_deepspeed_enabled or not has_adapter_files(best, peft_model):  # DeepSpeed: its engine files
            return super()._load_best_model()
        load_adapters_in_place(peft_model, best)


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """A `transformers.Trainer` for a peftkit `PeftModel`; every argument is Trainer's.

    Differences from the stock Trainer: checkpoints and `save_model()` write only the adapter
    (PEFT format, loadable with `peftkit.PeftModel.from_pretrained` or `peft.PeftModel`);
    `resume_from_checkpoint` and `load_best_model_at_end` load the adapter in place; label
    smoothing shifts labels for causal LMs as Trainer does for `peft` models.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        user_collator = kwargs.get("data_collator", args[2] if len(args) > 2 else None)
        super().__init__(*args, **kwargs)
        self._require_unsharded()
        if user_collator is None:
            # Trainer's default collator stacks rows as they are: tokenized rows of different
            # lengths fail ("expected sequence of length 21 at dim 1 (got 23)"), and its
            # tokenizer-padding one leaves the labels ragged. Such batches are padded here.
            self.data_collator = RaggedRowsCollator(self.data_collator, padding_collator(self.model,
                                                                                       self.processing_class))
        if self.label_smoother is not None and is_causal_lm(self.model.get_base_model()):
            # Trainer picks the label shift from the model's class name, which for a peftkit
            # wrapper is not a causal-LM name; without the shift each position would be
            # scored against its own token instead of the next one.
            self.label_smoother = _ShiftingLabelSmoother(self.label_smoother.epsilon,
                                                         self.label_smoother.ignore_index)


class RaggedRowsCollator:
    """Trainer's default collator for rows of equal length; `peftkit.data.make_collator`'s padding
    (input_ids with the pad id, labels with -100, an attention_mask) when the rows' lengths differ."""

    def __init__(self, default: Any, padding: Any) -> None:
        self.default, self.padding = default, padding

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        return self.padding(rows) if _ragged(rows) else self.default(rows)


def _ragged(rows: list[Any]) -> bool:
    lengths = set()
    for row in rows:
        if not isinstance(row, dict):
            return False
        for key in ("input_ids", "labels", "attention_mask"):
            value = row.get(key)
            if isinstance(value, (list, tuple, torch.Tensor)):
                lengths.add((key, len(value)))
    keys = [key for key, _ in lengths]
    return len(keys) != len(set(keys))


def padding_collator(model: nn.Module, tokenizer: Any | None) -> Any:
    """`peftkit.data.make_collator` for the adapter's task, padding with the tokenizer's pad id
    (else the model config's pad / EOS id; padded positions are masked from attention and loss)."""
    from ..data import DataCollator, make_collator
    from ..data.tasks import task_of_task_type

    peft_model = model if isinstance(model, PeftModel) else None
    task_type = peft_model.peft_config[peft_model.active_adapter].task_type if peft_model is not None else None
    task = task_of_task_type(task_type) or "causal-lm"
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    if getattr(tokenizer, "pad_token_id", None) is not None or getattr(tokenizer, "eos_token_id", None) is not None:
        return make_collator(tokenizer, task)
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    return DataCollator(pad if isinstance(pad, int) else 0, task=task)


def _require_peft_model(model: nn.Module, trainer: str = "Trainer", stock: str = "transformers.Trainer") -> None:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"peftkit.integrations.{trainer} trains a peftkit PeftModel, got {type(model).__name__}; "
            f"wrap the model with peftkit.get_peft_model(model, config), or use {stock} for a plain model"
        )


class _ShiftingLabelSmoother(LabelSmoother):
    def __call__(self, model_output, labels, shift_labels: bool = False, num_items_in_batch=None):
        return super().__call__(model_output, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)


def adapter_dir(root: str, adapter_name: str) -> str:
    """Where an adapter lives in a saved folder: the root for "default", else a sub-folder
    named after it (PEFT's layout, as written by `PeftModel.save_pretrained`)."""
    return adapter_folder(root, adapter_name)


def has_adapter_files(folder: str | None, model: PeftModel) -> bool:
    """True when `folder` holds a saved adapter for at least one of `model`'s adapters."""
    if not folder:
        return False
    return any(os.path.isfile(os.path.join(adapter_dir(folder, name), SAFETENSORS_NAME)) for name in model.peft_config)


def load_adapters_in_place(model: PeftModel, folder: str) -> None:
    """Copy every adapter of `model` from `folder` into the model's existing tensors.

    Strict: a missing adapter file, a missing or unexpected tensor, or a shape mismatch raises,
    because resuming on a partly loaded adapter silently trains something else.
    """
    problems = []
    states = {}
    for name in model.peft_config:
        path = os.path.join(adapter_dir(folder, name), SAFETENSORS_NAME)
        if not os.path.isfile(path):
            problems.append(f"adapter {name!r}: no {path!r}")
            continue
        # Float tensors, no NaN / Inf: a diverged checkpoint must not be resumed unannounced.
        states[name] = read_checked_adapter(adapter_dir(folder, name), model.peft_config[name])
    if problems:
        raise CheckpointMismatchError(f"Checkpoint {folder!r} does not hold every adapter of the model "
                                      f"(adapters: {list(model.peft_config)}):\n- " + "\n- ".join(problems))
    for name, state in states.items():
        # PeftModel's own loader knows each method's layout (layer adapters, prompt encoders).
        report = model.load_adapter_state(name, state)
        if report.missing_keys or report.unexpected_keys:
            raise CheckpointMismatchError(f"Checkpoint {folder!r}, adapter {name!r}: {report}. The checkpoint was "
                                          f"written for a different adapter config (r, target_modules, bias...)")


def _save_gathered(model: PeftModel, output_dir: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Save each adapter with its values taken from `state_dict` (keys as in `model.state_dict()`)."""
    names_by_storage = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() > 0:
            names_by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), name)
    for adapter in model.peft_config:
        local = model.adapter_state_dict(adapter)
        gathered = {}
        for key, tensor in local.items():
            name = names_by_storage.get((tensor.data_ptr(), tuple(tensor.shape))) if tensor.numel() > 0 else None
            if name is None or name not in state_dict:
                raise ValueError(
                    f"Cannot find adapter tensor {key} (shape {tuple(tensor.shape)}) in the gathered state dict "
                    f"Trainer passed to _save: the local tensor is sharded (DeepSpeed ZeRO-3) or computed, not a "
                    f"parameter (e.g. prefix tuning's projection). Use ZeRO-1/2, or gather the parameters and "
                    f"call model.save_pretrained() after training"
                )
            gathered[key] = state_dict[name]
        out = adapter_dir(output_dir, adapter)
        os.makedirs(out, exist_ok=True)
        write_safetensors(os.path.join(out, SAFETENSORS_NAME), gathered)
        # As PeftModel.save_pretrained: a saved adapter loads for inference unless asked otherwise.
        config = copy.deepcopy(model.peft_config[adapter])
        config.inference_mode = True
        config.save_pretrained(out)
