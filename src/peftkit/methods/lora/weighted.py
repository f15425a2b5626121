"""Combine existing LoRA adapters into a new one (PEFT's `add_weighted_adapter`).

Combination types, as in PEFT 0.21:
- "linear" (and "ties", "dare_linear", "dare_ties", "magnitude_prune"): equal ranks; A and B are
  merged separately with weights sqrt(|w s|) (the sign on A only). Cheap, but B'A' != sum w s B A.
- "cat": A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1, B_2, ...]; exact, rank = sum of ranks.
- "svd" (and "<pruning>_svd"): the weighted sum of full deltas truncated by SVD to `svd_rank`
  (default: the largest source rank), optionally clamped at the `svd_clamp` quantile.
The new adapter has r = lora_alpha = new rank (scaling 1), the union of the target modules, and
is added but not activated. With a single source adapter "linear" is used, as in PEFT.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..base import ModulesToSaveWrapper
from .init import parse_init
from .layer import Conv2d, Embedding, Linear, LoraLayer

_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATION_TYPES = ("cat",) + _FACTORWISE + _SVD
_NEEDS_DENSITY = tuple(t for t in COMBINATION_TYPES if t.split("_")[0] in ("ties", "dare", "magnitude"))


def weighted_adapter_configs(model: nn.Module, configs: dict, adapters: list[str], weights: list[float],
                             adapter_name: str, combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, density: float | None = None,
                             majority_sign_method: str = "total"):
    """(config to inject, config to keep) of the combined adapter `adapter_name` of LoRA `adapters`
    (their `configs`, on the adapted `model`). Raises ValueError listing every problem with the
    arguments at once."""
    _validate(model, configs, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
              majority_sign_method)
    combination_type = "linear" if len(adapters) == 1 else combination_type
    new_rank, targets = _new_rank_and_targets(configs, adapters, combination_type, svd_rank)
    source = configs[adapters[0]]
    # Scaling 1 (alpha = r, no rsLoRA): every factor below already carries its source scaling.
    # PEFT keeps use_rslora from the first adapter, which scales its result by sqrt(r).
    kept = dataclasses.replace(source, r=new_rank, lora_alpha=new_rank, target_modules=targets,
                               rank_pattern={}, alpha_pattern={}, use_rslora=False)
    # The factors are overwritten by `fill_weighted_adapter`, so no init may touch the (shared)
    # base weights now; the kept config has the source's init, as PEFT's does, for loading onto
    # the original base. A non-decomposing init is kept so the RNG advances as in PEFT (dare_*
    # then draws alike).
    init = source.init_lora_weights
    injected = dataclasses.replace(kept, init_lora_weights=True if parse_init(init).changes_base_weights else init)
    return injected, kept


def fill_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                          combination_type: str = "svd", svd_clamp: float | None = None, density: float | None = None,
                          majority_sign_method: str = "total") -> None:
    """Write the combination into the adapter `adapter_name` of every LoRA layer of `model`, freshly
    injected from `weighted_adapter_configs` (its rank is that config's r)."""
    combination_type = "linear" if len(adapters) == 1 else combination_type
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.adapter_names:
            continue
        new_rank = layer.r[adapter_name]
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if not present:
            raise ValueError(f"Module {path!r} is targeted by the combined adapter but holds none of {adapters}")
        if combination_type == "cat":
            lora_A, lora_B = _cat(layer, present)
        elif combination_type in _SVD:
            lora_A, lora_B = _svd(layer, path, present, combination_type, new_rank, svd_clamp, density,
                                  majority_sign_method)
        else:
            lora_A, lora_B = _factorwise(layer, path, present, combination_type, density, majority_sign_method)
        _write(layer, adapter_name, lora_A, lora_B)


def _validate(model, configs, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
              majority_sign_method) -> None:
    problems = []
    if not isinstance(adapters, (list, tuple)) or not adapters:
        problems.append(f"adapters={adapters!r} must be a non-empty list of adapter names")
        adapters = []
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        problems.append(f"adapters {unknown} do not exist; available adapters: {list(configs)}")
    known = [a for a in adapters if a in configs]
    not_lora = [a for a in known if configs[a].peft_type != "LORA"]
    if not_lora:
        problems.append(f"adapters {not_lora} are not LoRA adapters; add_weighted_adapter combines LoRA only")
    dora = [a for a in known if getattr(configs[a], "use_dora", False)]
    if dora:
        problems.append(f"adapters {dora} use DoRA, whose magnitude vector cannot be combined; use plain LoRA adapters")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters) or \
            not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        problems.append(f"weights={weights!r} must be a list of {len(adapters)} numbers, one per adapter")
    if not isinstance(adapter_name, str) or not adapter_name:
        problems.append(f"adapter_name={adapter_name!r} must be a non-empty string")
    elif adapter_name in configs:
        problems.append(f"adapter_name={adapter_name!r} already exists; pick a new name (existing: {list(configs)})")
    if combination_type not in COMBINATION_TYPES:
        problems.append(f"combination_type={combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    if combination_type in _NEEDS_DENSITY:
        if len(adapters) > 1 and (not isinstance(density, (int, float)) or not 0.0 < density <= 1.0):
            problems.append(f"density={density!r} must be a number in (0, 1] for combination_type={combination_type!r}")
    elif density is not None:
        problems.append(f"density={density!r} only applies to combination types {list(_NEEDS_DENSITY)}")
    if majority_sign_method not in ("total", "frequency"):
        problems.append(f"majority_sign_method={majority_sign_method!r} is not one of ['total', 'frequency']")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        problems.append(f"svd_rank={svd_rank!r} must be a positive integer or None")
    if svd_clamp is not None and (not isinstance(svd_clamp, (int, float)) or not 0.0 <= svd_clamp <= 1.0):
        problems.append(f"svd_clamp={svd_clamp!r} must be a quantile in [0, 1] or None")
    if len(known) > 1 and combination_type in _FACTORWISE:
        ranks = {a: _max_rank(configs[a]) for a in known}
        if len(set(ranks.values())) > 1:
            problems.append(f"combination_type={combination_type!r} needs equal ranks, got {ranks}; "
                            f"use 'cat' or 'svd' for adapters of different ranks")
    kinds = {a: type(configs[a].target_modules).__name__ for a in known}
    if len(set(kinds.values())) > 1:
        problems.append(f"target_modules of {known} mix lists and regex strings ({kinds}); cannot build their union")
    shared = [path for path, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
              and sum(a in m.modules_to_save for a in known) > 1]
    if shared:
        problems.append(f"adapters {known} each hold a modules_to_save copy of {shared}; such copies cannot be combined")
    if problems:
        raise ValueError("add_weighted_adapter: " + "; ".join(problems))


def _max_rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_rank_and_targets(configs, adapters, combination_type, svd_rank):
    ranks = [_max_rank(configs[a]) for a in adapters]
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in _SVD:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    targets = [configs[a].target_modules for a in adapters]
    if isinstance(targets[0], str):
        union = "|".join(f"({t})" for t in targets)
    else:
        union = sorted(set().union(*targets))
    return new_rank, union


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) parameters of adapter `name`; Embedding keeps them in its own containers."""
    if isinstance(layer, Embedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _cat(layer, present):
    As = [_factors(layer, a)[0].detach() * w * layer.scaling[a] for a, w in present]
    Bs = [_factors(layer, a)[1].detach() for a, _ in present]
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _factorwise(layer, path, present, combination_type, density, majority_sign_method):
    shapes = {a: tuple(_factors(layer, a)[0].shape) for a, _ in present}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"combination_type={combination_type!r} needs equal ranks, but at {path!r} the lora_A "
                         f"shapes differ: {shapes}")
    weights_A, weights_B, As, Bs = [], [], [], []
    for adapter, weight in present:
        scaled = weight * layer.scaling[adapter]
        # The sign goes on A only, else a negative weight would cancel out in B @ A.
        weights_A.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        weights_B.append(math.sqrt(abs(scaled)))
        lora_A, lora_B = _factors(layer, adapter)
        As.append(lora_A.detach())
        Bs.append(lora_B.detach())
    dtype = As[0].dtype
    out = []
    for tensors, factor_weights in ((As, weights_A), (Bs, weights_B)):
        merged = _combine(combination_type, tensors, torch.tensor(factor_weights).to(tensors[0].device),
                                   density, majority_sign_method)
        out.append(merged.to(dtype))
    return out[0], out[1]


def _svd(layer, path, present, combination_type, new_rank, clamp, density, majority_sign_method):
    deltas = [_delta_out_in(layer, a) for a, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = _combine(combination_type[: -len("_svd")] if combination_type != "svd" else "linear",
                              deltas, weights, density, majority_sign_method)
    conv_shape = None
    if isinstance(layer, Conv2d):
        conv_shape = delta.shape
        delta = delta.flatten(start_dim=1)
    if new_rank > min(delta.shape):
        raise ValueError(f"svd_rank={new_rank} exceeds the rank limit {min(delta.shape)} of module {path!r} "
                         f"(delta shape [out, in] = {list(delta.shape)}); pass a smaller svd_rank")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        limit = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-limit, limit), Vh.clamp(-limit, limit)
    if conv_shape is not None:
        return Vh.reshape(new_rank, *conv_shape[1:]), U.reshape(conv_shape[0], new_rank, 1, 1)
    return Vh, U


def _delta_out_in(layer: LoraLayer, name: str) -> torch.Tensor:
    """The adapter's scaled delta as [out, in] (Linear, Conv1D), [dim, num] (Embedding) or the
    conv kernel [out, in, kh, kw]."""
    delta = layer.get_delta_weight(name)
    if isinstance(layer, Embedding) or (isinstance(layer, Linear) and layer.fan_in_fan_out):
        return delta.T
    return delta


@torch.no_grad()
def _write(layer: LoraLayer, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Copy the combined factors into the new adapter, zero-padding ranks it does not fill."""
    param_A, param_B = _factors(layer, name)
    param_A.zero_()
    param_B.zero_()
    param_A[: lora_A.shape[0]] = lora_A.to(param_A.dtype)
    param_B[:, : lora_B.shape[1]] = lora_B.to(param_B.dtype)


# --- merging a list of same-shape tensors (PEFT's merge_utils, same order of operations) -------
def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
             majority_sign_method: str) -> torch.Tensor:
    """Weighted merge of `tensors` by `kind`: linear, ties, dare_linear, dare_ties or magnitude_prune.

    The dare kinds draw their random masks from the global RNG (seed it for repeatable results).
    """
    if kind == "ties" or kind == "magnitude_prune":
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif kind.startswith("dare"):
        tensors = [_prune(t, density, "random") for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if kind in ("ties", "dare_ties"):
        sign = stacked.sign()
        magnitude = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
        keep = sign == torch.where(magnitude >= 0, 1, -1)
        return (weighted * keep).sum(dim=0) / torch.clamp(keep.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _prune(tensor: torch.Tensor, density: float, method: str) -> torch.Tensor:
    """Keep a `density` fraction of entries: the largest |values|, or a random (rescaled) subset."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density
