"""What prompt-learning methods share: an adapter that changes the model's *inputs*
(virtual tokens) instead of its layers.

A `PromptLearningEncoder` owns one adapter's parameters and knows how to
- run a forward with its virtual tokens (`run`): extend the attention mask, pad labels, and
  let the subclass add the tokens (prepended embeddings, or a key/value cache prefix);
- generate with them (`generate`): temporarily wrap the model's `prepare_inputs_for_generation`
  so the virtual tokens enter at the prefill step and the mask covers them at every step;
- save and load itself as PEFT does (one tensor under the plain key `prompt_embeddings`).

`PeftModel` keeps one encoder per adapter and only dispatches to these hooks. The encoder
never stores the base model (that would make the model a sub-module of its own adapter);
it is passed in at each call.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import ConfigError, TaskType
from . import Method

@dataclass(frozen=True)
class PromptLearningMethod(Method):
    """A registered method whose adapter is an encoder on the PeftModel, not wrapped layers."""

    # (base model, config) -> encoder; fills the config's model-shape fields in place.
    create_encoder: Callable[[nn.Module, Any], "PromptLearningEncoder"] | None = None
    prompt_learning: bool = True


def word_embeddings(model: nn.Module) -> nn.Module:
    """The base model's input embedding (what PEFT finds by name or by vocabulary size)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    if embedding is None:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(); prompt learning needs the model's "
                         f"word embedding to turn input_ids into vectors")
    return embedding


def _model_config_dict(model: nn.Module) -> tuple[Any, dict]:
    config = getattr(model, "config", None)
    if config is None:
        return None, {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return config, data.get("text_config") or data  # multimodal models: the language part


def _first_key(data: dict, names: tuple[str, ...]):
    return next((data[n] for n in names if data.get(n) is not None), None)


def fill_from_model(config, model: nn.Module) -> dict:
    """Fill `num_layers`, `token_dim`, `num_attention_heads`, `num_transformer_submodules` from the
    model's config where they are None (PEFT's rules and key names); return the config dict read."""
    model_config, data = _model_config_dict(model)
    if config.num_layers is None:
        config.num_layers = getattr(model_config, "num_hidden_layers", None) or _first_key(
            data, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.token_dim is None:
        config.token_dim = _first_key(data, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_key(
            data, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, n) is None]
    if missing:
        source = type(model_config).__name__ if model_config is not None else f"{type(model).__name__} (no config)"
        raise ValueError(f"Cannot read {missing} from {source}; set them in the {type(config).__name__} explicitly")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    return data


def check_filled(config) -> None:
    """Re-validate once the model-shape fields are filled in (they may come from the model)."""
    problems = config.problems()
    if problems:
        raise ConfigError(f"Invalid {type(config).__name__} for this model:\n- " + "\n- ".join(problems))


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which `model.forward` takes a key/value cache (`cache` in transformers
    >= 5.2x, `past_key_values` before), looking through to the backbone when the head model only
    forwards `**kwargs` (e.g. BertForSequenceClassification); None when there is none."""
    candidates = [model]
    backbone = getattr(model, "base_model", None)  # transformers: the backbone under base_model_prefix
    if isinstance(backbone, nn.Module) and backbone is not model:
        candidates.append(backbone)
    for module in candidates:
        params = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
    return None


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments turned into keywords, named as in `model.forward`."""
    kwargs = dict(kwargs)
    if not args:
        return kwargs
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes at most {len(names)} positional arguments "
                        f"({names}); got {len(args)}")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"forward got two values for argument {name!r}")
        kwargs[name] = value
    return kwargs


def _prepend(tensor: torch.Tensor, n: int, value) -> torch.Tensor:
    """[B, L] -> [B, n + L] with `value` in the first n columns (same dtype and device)."""
    pad = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat((pad, tensor), dim=1)


class PromptLearningEncoder(nn.Module):
    """One prompt-learning adapter. Subclasses implement `add_virtual_tokens` (training/eval
    forward), `add_virtual_tokens_for_generation`, `saved_embeddings` and `load_saved_embeddings`."""

    # False where transformers' checkpointed layers would drop what the adapter feeds in (a cache).
    supports_gradient_checkpointing = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    # --- subclass hooks -------------------------------------------------------------------------
    def add_virtual_tokens(self, model: nn.Module, inputs: dict, batch_size: int) -> None:
        raise NotImplementedError

    def add_virtual_tokens_for_generation(self, model: nn.Module, inputs: dict, prefill: bool) -> None:
        raise NotImplementedError

    def saved_embeddings(self) -> torch.Tensor:
        """The tensor PEFT saves as `prompt_embeddings`."""
        raise NotImplementedError

    def load_saved_embeddings(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    # --- forward --------------------------------------------------------------------------------
    def run(self, model: nn.Module, args: tuple, kwargs: dict):
        """`model(*args, **kwargs)` with this adapter's virtual tokens in front of every sequence."""
        inputs = _bind(model, args, kwargs)
        input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            raise ValueError("Prompt learning needs input_ids or inputs_embeds to know the batch size; got neither")
        batch_size = (input_ids if input_ids is not None else embeds).shape[0]
        if inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = _prepend(inputs["attention_mask"], self.num_virtual_tokens, 1)
        if self.config.task_type == TaskType.CAUSAL_LM and inputs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are not supported with prompt learning for causal LMs; ignoring them",
                          stacklevel=3)
            inputs["token_type_ids"] = None
        self.add_virtual_tokens(model, inputs, batch_size)
        return model(**inputs)

    # --- generate -------------------------------------------------------------------------------
    def generate(self, model: nn.Module, args: tuple, kwargs: dict):
        """`model.generate(*args, **kwargs)` with the virtual tokens fed at the prefill step."""
        if self.config.task_type != TaskType.CAUSAL_LM:
            raise ValueError(f"generate needs task_type='CAUSAL_LM'; this adapter has task_type={self.config.task_type!r}")
        own = model.__dict__.get("prepare_inputs_for_generation")
        original = model.prepare_inputs_for_generation
        key = cache_argument(model)

        @functools.wraps(original)
        def prepare(*a, **kw):
            inputs = original(*a, **kw)
            self._prepare_step(model, inputs, key)
            return inputs

        model.prepare_inputs_for_generation = prepare
        try:
            return model.generate(*args, **kwargs)
        finally:
            if own is None:
                del model.prepare_inputs_for_generation
            else:
                model.prepare_inputs_for_generation = own

    def _prepare_step(self, model: nn.Module, inputs: dict, cache_key: str | None) -> None:
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                got = f"{mask.dim()}-D tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"Prompt-learning generate needs a 2-D attention mask ([batch, length]); got a {got} "
                                 f"(static/compiled caches build 4-D masks: use the default dynamic cache)")
            inputs["attention_mask"] = _prepend(mask, self.num_virtual_tokens, 1)
        cache = inputs.get(cache_key) if cache_key else None
        # Without use_cache every step re-reads the whole sequence, so the virtual tokens go in every time
        # (a cache the model handed back from the previous step must not be reused then).
        prefill = cache is None or cache.get_seq_length() == 0 or inputs.get("use_cache") is False
        self.add_virtual_tokens_for_generation(model, inputs, prefill)
