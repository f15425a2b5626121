"""The causal-LM loss without the full logits: backbone -> hidden states -> fused lm_head + CE.

`fused_causal_lm_loss(model, batch)` returns what `loss.causal_lm_loss` returns (the summed
next-token loss and the target count) computed by `kernels.causal_lm_loss`, which never forms
the [B, T, V] logits nor their fp32 log-softmax (about half of the saved activations of a
small model at V = 32000). It returns None whenever that split of the model is not known to be
exact; the caller then runs the plain path:

    out = fused_causal_lm_loss(model, batch)
    loss_sum, n_targets = out if out is not None else causal_lm_loss(model, batch)
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn

from .. import kernels
from ..model import PeftModel
from .data import Batch
from .loss import IGNORE_INDEX

__all__ = ["fused_causal_lm_loss", "fused_loss_blocker"]

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

_verdicts: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def fused_causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loss_sum fp32 0-d, n_targets int64 0-d) as `loss.causal_lm_loss`, or None when the
    fused path does not apply (see `fused_loss_blocker` for the reasons).

    batch: input_ids [B, T] (or inputs_embeds), labels [B, T] unshifted, optional
    attention_mask / position_ids. Under autocast the head runs in the autocast dtype.
    """
    if fused_loss_blocker(model, batch) is not None:
        return None
    base = _transformers_model(model)
    backbone, head = base.base_model, base.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = backbone(**inputs, use_cache=False)[0]
    return kernels.causal_lm_loss(hidden, head.weight, batch["labels"], bias=head.bias, ignore_index=IGNORE_INDEX)


def fused_loss_blocker(model: nn.Module, batch: Batch) -> str | None:
    """Why `fused_causal_lm_loss` would return None for this model and batch, or None if it applies.

    The first successful check of a model runs a short probe forward (no grad, RNG state
    restored) to confirm its logits are exactly lm_head(backbone(...)); the verdict is cached
    per model.
    """
    if not kernels.fast_paths_enabled():
        return "fast paths are disabled (kernels.set_fast_paths(False) or PEFTKIT_FAST_PATHS=0)"
    if "labels" not in batch:
        return "the batch has no labels"
    base = _transformers_model(model)
    if base is None:
        # DDP / DataParallel / DeepSpeed wrap the model as `.module` and FSDP replaces it:
        # calling the inner backbone directly would skip the wrapper's forward, and with it
        # DDP's gradient synchronisation and FSDP's parameter gathering.
        return f"{type(model).__name__} is neither a peftkit PeftModel nor a transformers model (a DDP/FSDP wrapper?)"
    if isinstance(model, PeftModel) and model._active_prompt_encoder() is not None:
        return f"a prompt-learning adapter ({model.peft_type}) is active: it changes the inputs of the forward"
    for obj in (model, base):
        if "forward" in vars(obj) and not _accelerate_autocast_replayed(obj, batch):
            # A forward patched on the instance adds something the backbone call would skip.
            return (f"{type(obj).__name__}.forward is patched on the instance (accelerate's mixed-precision "
                    f"wrapper needs the call inside `accelerator.autocast()`)")
    if any(_is_fsdp(m) for m in (model, base)):
        return "the model is sharded with FSDP"
    reason = _static_blocker(base)
    if reason is not None:
        return reason
    if base not in _verdicts:
        _verdicts[base] = _probe(base, batch)
    return _verdicts[base]


def _accelerate_autocast_replayed(obj: nn.Module, batch: Batch) -> bool:
    """Accelerate's mixed-precision `prepare` replaces forward by autocast(forward) plus an fp32
    cast of the outputs (and keeps `_original_forward`); under an active autocast — the caller
    inside `accelerator.autocast()` — the backbone call computes the same."""
    if not hasattr(obj, "_original_forward"):
        return False
    device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    return torch.is_autocast_enabled(device.type)


def _transformers_model(model: nn.Module) -> nn.Module | None:
    inner = model.base_model if isinstance(model, PeftModel) else model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the training loop
        return None
    return inner if isinstance(inner, PreTrainedModel) else None


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # builds without torch.distributed
        return False
    return isinstance(module, (FSDPModule, FullyShardedDataParallel))


def _static_blocker(base: nn.Module) -> str | None:
    backbone = base.base_model
    if backbone is base:
        return f"{type(base).__name__} has no separate backbone (base_model_prefix)"
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        # A LoRA-wrapped head, a modules_to_save copy, or no head at all.
        return f"the output head is {type(head).__name__}, not a plain nn.Linear"
    if getattr(base, "hf_device_map", None) and len(set(base.hf_device_map.values())) > 1:
        return "the model is split over several devices (device_map)"
    if getattr(head, "_hf_hook", None) is not None or head.weight.device.type == "meta":
        return "the output head is offloaded or hooked by accelerate"
    config = getattr(base, "config", None)
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
def _probe(base: nn.Module, batch: Batch) -> str | None:
    """None if the full forward's logits equal lm_head(backbone(...)) on a few tokens."""
    ids = batch.get("input_ids")
    if ids is None or ids.dim() != 2:
        return "the batch has no [B, T] input_ids to check the model's head with"
    t = min(_PROBE_TOKENS, ids.shape[1])
    inputs: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "labels":
            continue
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[:2] != ids.shape:
            return f"batch[{key!r}] is not a [B, T, ...] tensor; cannot check the model's head"
        inputs[key] = value[:1, :t]
    head = base.get_output_embeddings()
    devices = [ids.device] if ids.device.type != "cpu" else []
    # Same seed for both passes: dropout in a model in train mode draws the same masks.
    # force_eager: a one-off no-grad pass would otherwise compile an extra graph per layer
    # class when the layers are compiled (compile_decoder_layers).
    with torch.random.fork_rng(devices=devices, device_type=ids.device.type), torch.compiler.set_stance("force_eager"):
        seed = torch.seed()
        full = base(**inputs, use_cache=False)
        full = full.logits if hasattr(full, "logits") else full[0]  # return_dict=False: a tuple
        torch.manual_seed(seed)
        split = head(base.base_model(**inputs, use_cache=False)[0])
    if full.shape != split.shape:
        return f"the model's logits {list(full.shape)} are not lm_head(hidden) {list(split.shape)}"
    full, split = full.float(), split.float()
    tol = 1e-3 * float(split.abs().max().clamp_min(1e-6))
    if not torch.allclose(full, split, rtol=1e-3, atol=tol):
        return f"{type(base).__name__} transforms the lm_head output before returning the logits"
    return None
