"""Tiny models and synthetic rows shared by the training-loop tests and the DDP worker script."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, get_peft_model

VOCAB = 128


def tiny_llama(seed: int = 0, dropout: float = 0.0, r: int = 4):
    """A 2-layer Llama (hidden 64) with LoRA on all linear layers; same weights for the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, max_position_embeddings=128,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=dropout, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    # LoRA B starts at zero, which zeroes every lora_A gradient on step one; a random B
    # makes every trainable tensor move so the tests compare all of them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def tiny_bert_cls(seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    base = BertForSequenceClassification(config)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))


def lm_rows(n: int, seed: int = 0, min_len: int = 4, max_len: int = 16) -> list[dict]:
    """Counting sequences (next token = previous + 1) with a masked prompt of random length,
    so rows have unequal numbers of target tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        start = int(torch.randint(1, 9, (1,), generator=gen))  # few distinct rows: quick to learn
        ids = list(range(start, start + length))
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def cls_rows(n: int, seed: int = 0, num_labels: int = 3) -> list[dict]:
    """The class is the first token modulo num_labels: learnable by a tiny model."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids[0] % num_labels})
    return rows


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
