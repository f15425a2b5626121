"""Prompt tuning: trainable virtual-token embeddings prepended to the input embeddings."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from ...checkpoint import copy_checked
from ...config import TaskType
from .config import PromptTuningConfig, PromptTuningInit
from ..prompt_learning import PromptLearningEncoder, check_filled, fill_from_model, word_embeddings


def init_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """PEFT's TEXT init ids: the tokenized text, truncated or repeated to `total` ids."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    # An adapter config must not be able to run code from a tokenizer repository (PEFT's rule).
    kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no ids with "
                         f"{config.tokenizer_name_or_path!r}; give a non-empty text")
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(PromptLearningEncoder):
    """`embedding.weight`: [num_virtual_tokens, token_dim], float32 (PEFT's layout)."""

    def __init__(self, config: PromptTuningConfig, words: nn.Module) -> None:
        super().__init__(config)
        total = config.num_virtual_tokens * config.num_transformer_submodules
        device = words.weight.device
        self.embedding = nn.Embedding(total, config.token_dim, device=device)
        # A loaded adapter overwrites the values, so (as in PEFT) inference mode skips the init and
        # does not need the tokenizer.
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM.value:
            return
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB.value:
            ids = torch.randint(0, words.num_embeddings, (total,), dtype=torch.long, device=device)
        else:
            ids = torch.tensor(init_token_ids(config, total), dtype=torch.long, device=device)
            if int(ids.max()) >= words.num_embeddings:
                raise ValueError(f"The tokenizer {config.tokenizer_name_or_path!r} produced id {int(ids.max())}, but "
                                 f"the model's vocabulary has {words.num_embeddings} entries; use the model's tokenizer")
        with torch.no_grad():
            vectors = words(ids).detach().to(torch.float32)
        if vectors.shape[-1] != config.token_dim:
            raise ValueError(f"token_dim={config.token_dim} but the model's word embeddings have size "
                             f"{vectors.shape[-1]}; leave token_dim unset to take it from the model")
        self.embedding.weight = nn.Parameter(vectors)

    def prompts(self, batch_size: int) -> torch.Tensor:
        """[batch, num_virtual_tokens, token_dim]."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def add_virtual_tokens(self, model: nn.Module, inputs: dict, batch_size: int) -> None:
        n = self.num_virtual_tokens
        if inputs.get("position_ids") is not None:
            warnings.warn("position_ids are not supported with prompt tuning (the virtual tokens shift every "
                          "position); ignoring them", stacklevel=4)
            inputs["position_ids"] = None
        if self.config.task_type == TaskType.SEQ_CLS and inputs.get("token_type_ids") is not None:
            types = inputs["token_type_ids"]
            inputs["token_type_ids"] = torch.cat((types.new_zeros(types.shape[0], n), types), dim=1)
        labels = inputs.get("labels")
        if self.config.task_type == TaskType.CAUSAL_LM and labels is not None:
            pad = torch.full((labels.shape[0], n), -100, dtype=labels.dtype, device=labels.device)
            inputs["labels"] = torch.cat((pad, labels), dim=1)
        self._prepend_prompts(model, inputs, batch_size)

    def add_virtual_tokens_for_generation(self, model: nn.Module, inputs: dict, prefill: bool) -> None:
        # Positions come from the cache length, which counts the virtual tokens.
        inputs.pop("position_ids", None)
        if prefill:
            ids = inputs.get("input_ids")
            batch = (ids if ids is not None else inputs["inputs_embeds"]).shape[0]
            self._prepend_prompts(model, inputs, batch)

    def _prepend_prompts(self, model: nn.Module, inputs: dict, batch_size: int) -> None:
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = word_embeddings(model)(inputs["input_ids"])
        inputs["input_ids"] = None
        inputs["inputs_embeds"] = torch.cat((self.prompts(batch_size).to(embeds.dtype), embeds), dim=1)

    def saved_embeddings(self) -> torch.Tensor:
        return self.embedding.weight

    @torch.no_grad()
    def load_saved_embeddings(self, tensor: torch.Tensor) -> None:
        copy_checked(self.embedding.weight, tensor, "prompt_embeddings", "[num_virtual_tokens, token_dim]")


def create_encoder(model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
    fill_from_model(config, model)
    check_filled(config)
    return PromptEmbedding(config, word_embeddings(model))
