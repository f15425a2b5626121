"""Mixed-adapter batches at the model level: `model(**batch, adapter_names=[...])` and
`model.generate(..., adapter_names=[...])` give each row of the batch its own adapter
("__base__": the base model alone), as peft does.

The call is checked here (LoRA only, inference only, known names, one name per row, nothing
merged), then forward pre-hooks pass `adapter_names` to every adapter layer for the duration
of the call; the per-row arithmetic is in `methods/lora/mixed_batch.py` and in
`ModulesToSaveWrapper`. `generate` repeats each name for the rows that beam search or
`num_return_sequences` make of one input row (the encoder of an encoder-decoder model still
sees the rows as given).
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch
import torch.nn as nn

from .methods.base import AdapterLayer, ModulesToSaveWrapper
from .methods.lora.layer import Conv2d, Embedding, Linear
from .methods.lora.mixed_batch import BASE

# Adapter layer types whose forward takes `adapter_names` (exact types: a subclass with its own
# forward must opt in here rather than have the argument dropped).
ROW_AWARE_LAYERS = (Linear, Embedding, Conv2d, ModulesToSaveWrapper)


def check_adapter_names(peft_model: nn.Module, adapter_names) -> list[str]:
    """The names as a list, or a one-line error saying what is wrong with the call."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or not all(
            isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list with one adapter name (str) per row of the batch, "
                        f"'{BASE}' for the base model; got {adapter_names!r}")
    methods = sorted({config.peft_type for config in peft_model.peft_config.values()})
    if methods != ["LORA"]:
        raise ValueError(f"adapter_names= (a mixed-adapter batch) is supported for LoRA adapters only, as in peft; "
                         f"this model's adapters are {', '.join(methods)}")
    if peft_model.training:
        raise ValueError("adapter_names= is for inference: the model is in training mode; call model.eval() first")
    if peft_model._adapters_disabled:
        raise ValueError("adapter_names= cannot be used inside disable_adapter(): every row would get the base "
                         f"model; use '{BASE}' for the rows that should")
    unknown = sorted({n for n in adapter_names if n != BASE and n not in peft_model.peft_config})
    if unknown:
        raise ValueError(f"adapter_names holds unknown adapters {unknown}; loaded adapters: "
                         f"{list(peft_model.peft_config)} (or '{BASE}' for the base model)")
    return list(adapter_names)


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return len(value)
    return None


def _generated_copies(model: nn.Module, kwargs: dict) -> int:
    """How many rows `generate` makes of each input row (transformers repeats each row
    max(num_beams, num_return_sequences) times)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(sequences))


def _inject(adapter_names: list[str], module: nn.Module, args: tuple, kwargs: dict):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextlib.contextmanager
def rows_use_adapters(peft_model: nn.Module, adapter_names, args: tuple, kwargs: dict,
                      generate: bool = False) -> Iterator[None]:
    """Within the block, every adapter layer of `peft_model` computes row i with adapter
    `adapter_names[i]`; `args` / `kwargs` are the call's, for the batch-size check."""
    names = check_adapter_names(peft_model, adapter_names)
    rows = _batch_rows(args, kwargs)
    if rows is not None and rows != len(names):
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one adapter name "
                         f"(or '{BASE}') per row")
    model = peft_model.get_base_model()
    layers = [(path, layer) for path, layer in model.named_modules() if isinstance(layer, AdapterLayer)]
    unsupported = sorted(f"{path} ({type(layer).__name__})" for path, layer in layers
                         if type(layer) not in ROW_AWARE_LAYERS and not isinstance(layer, ModulesToSaveWrapper))
    if unsupported:
        raise ValueError(f"adapter_names= (a mixed-adapter batch) is not supported by these adapter layers: "
                         f"{unsupported}; supported: {[t.__name__ for t in ROW_AWARE_LAYERS]}")
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
    if merged:
        raise ValueError(f"adapter_names= cannot be used while adapters {merged} are merged into the base weights; "
                         f"call unmerge_adapter() first")
    decoder_names = names
    encoder_modules: set[int] = set()
    if generate:
        copies = _generated_copies(model, kwargs)
        decoder_names = [n for n in names for _ in range(copies)]
        get_encoder = getattr(model, "get_encoder", None)
        if copies > 1 and getattr(getattr(model, "config", None), "is_encoder_decoder", False) and get_encoder:
            encoder_modules = {id(m) for m in get_encoder().modules()}
    handles = []
    try:
        for _, layer in layers:
            layer_names = names if id(layer) in encoder_modules else decoder_names
            handles.append(layer.register_forward_pre_hook(partial(_inject, layer_names), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
