"""PrefixTuningConfig: PEFT's field names, defaults and JSON spelling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..prompt_learning_config import PromptLearningConfig

INIT_WEIGHTS_CHOICES = (None, "zero")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trainable key/value vectors for `num_virtual_tokens` positions in every
    attention layer, fed to the model as a pre-filled key/value cache.

    With `prefix_projection`, the prefix is computed by a two-layer MLP
    (token_dim -> encoder_hidden_size -> num_layers * 2 * token_dim) from per-token embeddings;
    PEFT saves only the MLP's output, so the MLP itself is not kept in the adapter file.
    `init_weights="zero"` starts with an all-zero prefix.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def problems(self) -> list[str]:
        out = super().problems()
        if self.init_weights not in INIT_WEIGHTS_CHOICES:
            out.append(f"init_weights={self.init_weights!r} is not one of {list(INIT_WEIGHTS_CHOICES)}")
        hidden = self.encoder_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden <= 0):
            out.append(f"encoder_hidden_size={hidden!r} must be a positive integer (or None for token_dim)")
        if not isinstance(self.prefix_projection, bool):
            out.append(f"prefix_projection={self.prefix_projection!r} must be true or false")
        dim, heads = self.token_dim, self.num_attention_heads
        if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads:
            out.append(f"token_dim={dim} is not divisible by num_attention_heads={heads}; each head's key/value "
                       f"prefix needs token_dim / num_attention_heads dimensions")
        return out
