"""A transformers causal LM as backbone -> hidden states -> lm_head, and its loss from the
hidden states in row chunks (`kernels.causal_lm_loss`), never forming the [B, T, V] logits
nor their fp32 log-softmax (about half of the saved activations of a small model at V = 32000).

`split_blocker` says why that split would not compute exactly what the model's own forward
computes (a transformed head output, a wrapped head, FSDP, ...); `PeftModel` uses the split
only where it returns None. The first check of a model runs a short probe forward (no grad,
RNG state restored) to confirm its logits are exactly lm_head(backbone(...)); the verdict is
cached per model.
"""
from __future__ import annotations

import dataclasses

import weakref
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import kernels
from .config import IGNORE_INDEX


# Config attributes of architectures that transform the logits after the lm_head (Gemma 2/3
# soft-capping, Cohere's logit_scale, Granite's logits_scaling, muP-style multipliers, ...).
# Present and not None means the head's output is not the logits, so the split is refused.
_POST_HEAD_ATTRS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "output_logit_soft_cap",
    "logits_soft_cap",
    "logits_mup_width_multiplier",
    "lm_head_multiplier",
    "dim_model_base",
)
_POST_HEAD_FLAGS = ("mup_enabled",)

# Tokens of the first row used to check, once per model, that the full forward's logits are
# exactly lm_head(backbone(...)) (catches a post-head transform no attribute above names).
_PROBE_TOKENS = 8

# Keyword arguments of a causal LM's forward that only its loss reads (not the backbone).
_LOSS_ONLY_KWARGS = ("num_items_in_batch",)
# Keyword arguments with which the split would not return what the model's forward returns:
# tuples, a subset of positions, pre-shifted labels, TRL's own fused head, MoE auxiliary losses.
_SPLIT_KWARG_BLOCKERS = {
    "return_dict": lambda v: v is False,
    "logits_to_keep": lambda v: v not in (0, None),
    "num_logits_to_keep": lambda v: v not in (0, None),
    "shift_labels": lambda v: v is not None,
    "fused_lm_head": lambda v: bool(v),
    "output_router_logits": lambda v: bool(v),
}


_verdicts: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def split_blocker(model: nn.Module, batch: Mapping[str, Any]) -> str | None:
    """Why `chunked_loss(model, batch)` would not equal the loss of `model`'s own logits, or None.

    model: the transformers causal LM (adapters injected); batch: its forward's keyword
    arguments with `labels`.
    """
    for key, blocks in _SPLIT_KWARG_BLOCKERS.items():
        if key in batch and blocks(batch[key]):
            return f"{key}={batch[key]!r} asks for something the split does not compute"
    batch = _split_inputs(batch)
    if not kernels.fast_paths_enabled("linear_cross_entropy"):
        return ("the linear_cross_entropy fast path is off (kernels.set_fast_path('linear_cross_entropy', False), "
                "set_fast_paths(False) or PEFTKIT_FAST_PATHS)")
    if batch.get("labels") is None:
        return "no labels were given"
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the package
        return "transformers is not installed"
    if not isinstance(model, PreTrainedModel):
        return f"{type(model).__name__} is not a transformers model"
    if "forward" in vars(model):
        # A forward patched on the instance adds something the backbone call would skip.
        return f"{type(model).__name__}.forward is patched on the instance"
    if model._forward_hooks or model._forward_pre_hooks:
        # The split calls the backbone and the head, not the model: its hooks would not run.
        return f"{type(model).__name__} has forward hooks, which the split would skip"
    if _is_fsdp(model):
        return "the model is sharded with FSDP"
    reason = _static_blocker(model)
    if reason is not None:
        return reason
    if model not in _verdicts:
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            # Not cached: the check runs on the first batch that has token ids.
            return "the batch has no [B, T] input_ids to check the model's head with"
        _verdicts[model] = _probe(model, batch)
    return _verdicts[model]


def chunked_loss(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(loss_sum fp32 0-d, n_targets int64 0-d, backbone outputs) of next-token cross-entropy.

    batch: input_ids [B, T] (or inputs_embeds), labels [B, T] unshifted, and whatever else the
    model's forward takes. Call only where `split_blocker` returned None. Under autocast the
    head runs in the autocast dtype, as the model's own head would.
    """
    inputs = {k: v for k, v in _split_inputs(batch).items() if k != "labels"}
    inputs.setdefault("use_cache", False)
    outputs = backbone(model)(**inputs)
    head = model.get_output_embeddings()
    loss_sum, n = kernels.causal_lm_loss(outputs[0], head.weight, batch["labels"], bias=head.bias,
                                         ignore_index=IGNORE_INDEX)
    return loss_sum, n, outputs


def chunked_causal_lm_output(model: nn.Module, kwargs: Mapping[str, Any]):
    """transformers' causal-LM output of `model(**kwargs)` with the loss (the mean over targets,
    or the sum over `num_items_in_batch` as Trainer passes it) and `logits=None`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.get("num_items_in_batch")
    loss_sum, n, outputs = chunked_loss(model, kwargs)
    denominator = n if num_items is None else num_items
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss_sum.device)
    # transformers 5.x renamed past_key_values to `cache` (and warns on the old name)
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    cache_field = "cache" if "cache" in names else "past_key_values"
    return CausalLMOutputWithPast(loss=loss_sum / denominator, logits=None,
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None),
                                  **{cache_field: getattr(outputs, cache_field, None)})


def _split_inputs(batch: Mapping[str, Any]) -> dict:
    return {k: v for k, v in batch.items() if k not in _LOSS_ONLY_KWARGS}


def backbone(model: nn.Module) -> nn.Module:
    """The transformers backbone of `model` (the module under its `base_model_prefix`, what
    transformers calls `model.base_model`; not a PeftModel's `base_model`, which is peft's tuner)."""
    return model.base_model


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # builds without torch.distributed
        return False
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal LM (its class or a base class is one of the auto causal-LM classes)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(cls.__name__ in names for cls in type(model).__mro__)


def _static_blocker(model: nn.Module) -> str | None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not is_causal_lm(model):
        # e.g. a seq2seq model turns labels into decoder inputs: its loss is not next-token
        # cross-entropy over the tokens the backbone is given.
        return f"{type(model).__name__} is not a decoder-only causal LM"
    if backbone(model) is model:
        return f"{type(model).__name__} has no separate backbone (base_model_prefix)"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        # A LoRA-wrapped head, a modules_to_save copy, or no head at all.
        return f"the output head is {type(head).__name__}, not a plain nn.Linear"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "the model is split over several devices (device_map)"
    if getattr(head, "_hf_hook", None) is not None or head.weight.device.type == "meta":
        return "the output head is offloaded or hooked by accelerate"
    config = getattr(model, "config", None)
    configs = [c for c in (config, getattr(config, "text_config", None)) if c is not None]
    for cfg in configs:
        for attr in _POST_HEAD_ATTRS:
            if getattr(cfg, attr, None) is not None:
                return f"config.{attr}={getattr(cfg, attr)!r}: the logits are transformed after the lm_head"
        for attr in _POST_HEAD_FLAGS:
            if getattr(cfg, attr, False):
                return f"config.{attr}=True: the logits are transformed after the lm_head"
    return None


@torch.no_grad()
def _probe(model: nn.Module, batch: Mapping[str, Any]) -> str | None:
    """None if the full forward's logits equal lm_head(backbone(...)) on a few tokens of the
    first row. A verdict about the model, not the batch: both passes see the same inputs, so
    tensors that are not per-token ([B, T, ...], e.g. a 4-D packed-rows mask) are left out."""
    ids = batch["input_ids"]
    t = min(_PROBE_TOKENS, ids.shape[1])
    inputs: dict[str, Any] = {}
    for key, value in batch.items():
        if key in ("labels", "use_cache") or value is None:
            continue
        if not isinstance(value, torch.Tensor):
            inputs[key] = value  # a flag such as output_hidden_states
        elif value.dim() == 2 and value.shape == ids.shape:
            inputs[key] = value[:1, :t]
    head = model.get_output_embeddings()
    devices = [ids.device] if ids.device.type != "cpu" else []
    # Same seed for both passes: dropout in a model in train mode draws the same masks.
    # force_eager: a one-off no-grad pass would otherwise compile an extra graph per layer
    # class when the layers are compiled (compile_decoder_layers).
    with torch.random.fork_rng(devices=devices, device_type=ids.device.type), torch.compiler.set_stance("force_eager"):
        seed = torch.seed()
        full = model(**inputs, use_cache=False)
        full = full.logits if hasattr(full, "logits") else full[0]  # return_dict=False: a tuple
        torch.manual_seed(seed)
        split = head(backbone(model)(**inputs, use_cache=False)[0])
    if full.shape != split.shape:
        return f"the model's logits {list(full.shape)} are not lm_head(hidden) {list(split.shape)}"
    full, split = full.float(), split.float()
    if not (bool(torch.isfinite(full).all()) and bool(torch.isfinite(split).all())):
        # NaN / Inf weights (an adapter loaded with check_finite=False): nothing to compare; the
        # plain path gives the loss, and the loop's NaN guard stops a run on it.
        return "the probe's logits are not finite, so the split cannot be checked"
    tol = 1e-3 * float(split.abs().max().clamp_min(1e-6))
    if not torch.allclose(full, split, rtol=1e-3, atol=tol):
        return f"{type(model).__name__} transforms the lm_head output before returning the logits"
    return None
