"""TRL's `SFTTrainer` for a peftkit `PeftModel`, with adapter-only checkpoints.

TRL recognises only the `peft` library's PeftModel. Given a peftkit model, stock
`trl.SFTTrainer` puts its fused lm-head (`add_fused_lm_head`, which calls `model.base_model`
expecting the transformers backbone) on the peftkit wrapper, whose `base_model` is peft's
tuner around the whole causal LM, and the first step fails; its checkpoints would also hold the whole model. This
subclass puts the fused head on the transformers model inside the wrapper, as TRL does for a
`peft` model, and saves checkpoints as `peftkit.integrations.Trainer` does.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import trl
from trl.trainer import sft_trainer as _sft_module

from ..model import PeftModel
from .trainer import AdapterCheckpoints, _require_peft_model


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """`trl.SFTTrainer` for a peftkit `PeftModel`; every argument is TRL's, except that the
    adapter comes with the model (`peft_config` is refused)."""

    def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
        _require_peft_model(model, "SFTTrainer", "trl.SFTTrainer")
        if kwargs.get("peft_config") is not None:
            raise ValueError("peft_config is for TRL's own `peft` wrapping; the peftkit model already carries its "
                             "adapter: pass peftkit.get_peft_model(model, config) as `model` and no peft_config")
        with _fused_head_inside_the_wrapper():
            super().__init__(model, *args, **kwargs)
        self._require_unsharded()


@contextlib.contextmanager
def _fused_head_inside_the_wrapper() -> Iterator[None]:
    """While TRL's __init__ runs, its `add_fused_lm_head` patches the transformers model inside
    a peftkit wrapper (PeftModel.forward passes `fused_lm_head=True` through to it)."""
    original = _sft_module.add_fused_lm_head

    def add_fused_lm_head(model, *args, **kwargs):
        return original(model.get_base_model() if isinstance(model, PeftModel) else model, *args, **kwargs)

    _sft_module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        _sft_module.add_fused_lm_head = original
