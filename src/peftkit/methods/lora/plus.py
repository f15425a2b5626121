"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A.

Grouping follows PEFT 0.21's `create_loraplus_optimizer`: LoRA embedding factors get their own
small learning rate; B factors and every other 1-D trainable tensor (DoRA magnitudes, biases,
norm weights of `modules_to_save` copies) get lr * ratio, with weight decay except for biases and
nn.LayerNorm parameters; everything else (A factors, 2-D `modules_to_save` weights) gets lr.
Parameters are found through the layer type and the container that holds them, never by name.
"""
from __future__ import annotations

import torch.nn as nn

from .layer import Conv2d, Embedding, Linear


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict]:
    """Optimizer parameter groups for LoRA+ over the trainable parameters of `model`.

    Returns up to four groups (empty ones are left out), each {"params", "lr", "weight_decay"}:
    A & others (lr), LoRA embeddings (embedding_lr), B & 1-D tensors (lr * ratio, `weight_decay`),
    biases & LayerNorm tensors among those (lr * ratio, no weight decay). Pass them to any
    torch optimizer, e.g. `torch.optim.AdamW(lora_plus_param_groups(model, 2e-4))`.
    """
    problems = []
    for name, value in (("lr", lr), ("ratio", ratio), ("embedding_lr", embedding_lr), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            problems.append(f"{name}={value!r} must be a non-negative number")
    if problems:
        raise ValueError("lora_plus_param_groups: " + "; ".join(problems))

    embedding, fast = _lora_roles(model)
    no_decay = _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    seen: set[int] = set()
    for param in model.parameters():  # model order, deduplicated (tied weights appear once)
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif id(param) in fast or param.ndim == 1:
            groups["B_no_decay" if id(param) in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    settings = {"A": (lr, weight_decay), "embedding": (embedding_lr, weight_decay),
                "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
            for key, params in groups.items() if params]


def _lora_roles(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of (LoRA embedding factors and base matrix, B factors and DoRA magnitudes) in `model`."""
    embedding, fast = set(), set()
    for module in model.modules():
        if isinstance(module, Embedding):
            # PEFT also puts a trainable base embedding matrix of a LoRA embedding in this group.
            for holder in (module.lora_embedding_A, module.lora_embedding_B, module.base_layer):
                embedding.update(id(p) for p in holder.parameters(recurse=False))
        elif isinstance(module, (Linear, Conv2d)):
            fast.update(id(p) for p in module.lora_B.parameters())
            if isinstance(module, Linear):
                fast.update(id(p) for p in module.lora_magnitude_vector.parameters())
    return embedding, fast


def _no_decay(model: nn.Module) -> set[int]:
    """ids of biases (a module's parameter registered as `bias`) and of nn.LayerNorm parameters."""
    out = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            out.update(id(p) for p in module.parameters(recurse=False))
        bias = module._parameters.get("bias")
        if bias is not None:
            out.add(id(bias))
    return out
