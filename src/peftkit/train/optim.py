"""Optimizer construction, kept in one function so variants (e.g. LoRA+ groups) plug in here."""

from __future__ import annotations

from typing import Callable

import torch

from .config import TrainConfig

OptimizerFactory = Callable[[torch.nn.Module, TrainConfig], torch.optim.Optimizer]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (`config.optimizer`: torch's, or bitsandbytes' 8-bit / paged one) over the trainable
    parameters; matrices decay, vectors (biases, norms) do not.

    With `lora_plus_ratio`, LoRA+ groups: B matrices learn `ratio` times faster than A.
    """
    adamw = _adamw_class(config.optimizer)
    if config.lora_plus_ratio is not None:
        from ..methods.lora.plus import lora_plus_param_groups

        groups = lora_plus_param_groups(model, config.lr, ratio=config.lora_plus_ratio,
                                        weight_decay=config.weight_decay)
        if not groups:
            raise ValueError("lora_plus_ratio is set but the model has no trainable parameters")
        return adamw(groups, lr=config.lr)
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True); "
            "wrap it with peftkit.get_peft_model(...) or unfreeze the parameters to train"
        )
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return adamw([g for g in groups if g["params"]], lr=config.lr)


def _adamw_class(name: str) -> type:
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise ValueError(f"train.optimizer: {name} is bitsandbytes' optimizer; pip install 'peftkit[quantization]' "
                         f"or use optimizer: adamw") from None
    return {"adamw_8bit": bnb_optim.AdamW8bit, "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
            "paged_adamw": bnb_optim.PagedAdamW}[name]
