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
from trl.trainer import utils as _trl_utils

from ..kernels.cross_entropy import auto_chunk_rows
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

    def compute_loss(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        """TRL's loss, its fused lm-head scoring the tokens in chunks sized by memory as peftkit's
        own chunked loss is (`kernels.cross_entropy.auto_chunk_rows`), not TRL's 32768 tokens per
        chunk: at 1024 tokens x 32k vocabulary that one chunk held the fp32 logits, log-probs and
        entropy of the whole batch at once (+1.4 GB on a CPU). The same values, chunk by chunk.
        With the head on a GPU TRL's size stays (each chunk reads the whole head again)."""
        labels = inputs.get("labels")
        head = self.model.get_output_embeddings().weight
        if labels is None or head.device.type != "cpu":  # a GPU re-reads the head per chunk: TRL's size
            return super().compute_loss(model, inputs, *args, **kwargs)
        with _logprob_chunk_rows(auto_chunk_rows(head.shape[0], labels.numel())):
            return super().compute_loss(model, inputs, *args, **kwargs)


@contextlib.contextmanager
def _logprob_chunk_rows(rows: int) -> Iterator[None]:
    """TRL's fused lm-head reads its tokens-per-chunk from a module global at each call (one value
    per process: trainers stepping in several threads at once would share it)."""
    original = _trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    _trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = rows
    try:
        yield
    finally:
        _trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = original


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
