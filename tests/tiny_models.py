"""Tiny transformers models built from configs (no downloads), with fixed weights per seed."""
from __future__ import annotations

import copy

import torch


def llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)).eval()


def bert_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=64,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


FACTORIES = {"llama": llama, "gpt2": gpt2, "bert": bert_cls, "t5": t5}


def inputs_for(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        batch["decoder_input_ids"] = torch.randint(1, 64, (2, 5), generator=g)
    return batch


def twin(model):
    """An independent copy with identical weights (for running two libraries side by side)."""
    return copy.deepcopy(model)


@torch.no_grad()
def perturb_trainable(model, seed: int = 3, scale: float = 0.05) -> None:
    """Give every trainable tensor non-trivial values so comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
