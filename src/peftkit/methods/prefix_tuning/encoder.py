"""Prefix tuning: per-layer key/value prefixes fed to the model as a pre-filled cache."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...checkpoint import copy_checked
from ..prompt_learning import PromptLearningEncoder, cache_argument, check_filled, fill_from_model
from .config import PrefixTuningConfig


class PrefixEncoder(PromptLearningEncoder):
    """Parameters (PEFT's names):
    - without projection: `embedding.weight` [num_virtual_tokens, num_layers * 2 * token_dim];
    - with projection: `embedding.weight` [num_virtual_tokens, token_dim] and `transform`
      (Linear token_dim -> encoder_hidden_size, Tanh, Linear -> num_layers * 2 * token_dim).

    A projected adapter loaded for inference holds only the saved projection output, as in PEFT.
    """

    # transformers drops the cache inside checkpointed layers, which would silently drop the prefix.
    supports_gradient_checkpointing = False

    def __init__(self, config: PrefixTuningConfig, device: torch.device | None = None) -> None:
        super().__init__(config)
        n, dim = config.num_virtual_tokens, config.token_dim
        width = config.num_layers * 2 * dim
        zero = config.init_weights == "zero"
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(n, dim, device=device)
            self.transform = nn.Sequential(nn.Linear(dim, config.encoder_hidden_size, device=device), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width, device=device))
            if zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width, device=device)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def flat_prefix(self) -> torch.Tensor:
        """[num_virtual_tokens, num_layers * 2 * token_dim]: per position, layer-major (k, v) pairs."""
        weight = self.embedding.weight
        return self.transform(weight) if self.transform is not None else weight

    def key_values(self, batch_size: int, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each [batch, num_attention_heads, num_virtual_tokens, head_dim]."""
        c = self.config
        flat = self.flat_prefix()
        heads = c.num_attention_heads
        kv = flat.view(c.num_virtual_tokens, c.num_layers * 2, heads, c.token_dim // heads).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        if dtype is not None:
            # Cast after the expand, as peft: the gradient is then summed over the batch in the
            # prefix's own dtype (fp32), not in the model's bf16/fp16.
            kv = kv.to(dtype)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(c.num_layers)]

    def cache(self, model: nn.Module, batch_size: int):
        from transformers import DynamicCache

        return DynamicCache(self.key_values(batch_size, getattr(model, "dtype", None)))

    def _cache_key(self, model: nn.Module, inputs: dict) -> str:
        key = cache_argument(model)
        if key is None:
            raise ValueError(f"{type(model).__name__}.forward takes no key/value cache (`cache` or `past_key_values`), "
                             f"which prefix tuning needs to feed its prefix")
        for name in ("cache", "past_key_values"):
            if inputs.get(name) is not None:
                raise ValueError(f"Prefix tuning supplies the model's key/value cache itself; do not pass {name}= "
                                 f"to forward (use generate for incremental decoding)")
            inputs.pop(name, None)
        return key

    def _shift_positions(self, inputs: dict) -> None:
        # The prefix occupies the first num_virtual_tokens cache positions.
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + self.num_virtual_tokens

    def add_virtual_tokens(self, model: nn.Module, inputs: dict, batch_size: int) -> None:
        self._shift_positions(inputs)
        key = self._cache_key(model, inputs)
        inputs[key] = self.cache(model, batch_size)

    def add_virtual_tokens_for_generation(self, model: nn.Module, inputs: dict, prefill: bool) -> None:
        from transformers import DynamicCache

        self._shift_positions(inputs)
        if not prefill:
            return
        key = cache_argument(model)
        ids = inputs.get("input_ids")
        batch = (ids if ids is not None else inputs["inputs_embeds"]).shape[0]
        existing = inputs.get(key)
        if isinstance(existing, DynamicCache) and existing.get_seq_length() == 0:
            # Fill generate's own cache, so the object it tracks between steps holds the prefix.
            for layer, (k, v) in enumerate(self.key_values(batch, getattr(model, "dtype", None))):
                existing.update(k, v, layer)
        elif existing is None or inputs.get("use_cache") is False:
            inputs[key] = self.cache(model, batch)
        else:
            raise ValueError(f"Prefix tuning generate supports the default dynamic cache; got {type(existing).__name__}"
                             f" (leave cache_implementation unset)")

    def saved_embeddings(self) -> torch.Tensor:
        return self.flat_prefix()

    @torch.no_grad()
    def load_saved_embeddings(self, tensor: torch.Tensor) -> None:
        if self.transform is not None:
            raise ValueError("This PREFIX_TUNING adapter has prefix_projection=True: its file holds only the projected "
                             "prefix (prompt_embeddings), not the projection MLP (PEFT's format), so it can be loaded "
                             "for inference (is_trainable=False) but not trained further with the projection")
        copy_checked(self.embedding.weight, tensor, "prompt_embeddings",
                     "[num_virtual_tokens, num_layers * 2 * token_dim]")


def _fill_kv_shape(config: PrefixTuningConfig, data: dict) -> None:
    """Grouped-query attention caches num_key_value_heads heads, not num_attention_heads (PEFT's rule)."""
    kv_heads = data.get("num_key_value_heads")
    if kv_heads is None:
        return
    if data.get("global_head_dim") is not None or data.get("per_layer_config") is not None:
        raise ValueError("Prefix tuning in peftkit does not support models whose layers have different key/value "
                         "shapes (global_head_dim / per_layer_config)")
    head_dim = data.get("head_dim") or config.token_dim // config.num_attention_heads
    config.token_dim = head_dim * kv_heads
    config.num_attention_heads = kv_heads


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now a deprecated alias).
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def create_encoder(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    data = fill_from_model(config, model)
    _fill_kv_shape(config, data)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    check_filled(config)
    if _checkpointing(model):
        raise ValueError("Prefix tuning does not work with gradient checkpointing: transformers drops the key/value "
                         "cache inside checkpointed layers. Disable it (model.gradient_checkpointing_disable())")
    if cache_argument(model) is None:
        raise ValueError(f"{type(model).__name__}.forward takes no key/value cache (`cache` or `past_key_values`), "
                         f"which prefix tuning needs to feed its prefix")
    device = next(model.parameters()).device
    return PrefixEncoder(config, device=device)
