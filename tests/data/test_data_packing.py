"""Packing: rows share a sequence but never attend to each other (checked on a tiny Llama)."""

from __future__ import annotations

import pytest
import torch
from datahelpers import prepare, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.data import IGNORE_INDEX, make_collator, pack_lengths

ROWS = [
    {"prompt": "What is the capital of France? ", "completion": "Paris."},
    {"prompt": "one two ", "completion": "three four five six seven"},
    {"prompt": "Translate to German: good morning. ", "completion": "Guten Morgen."},
    {"prompt": "The quick brown fox ", "completion": "jumps over the lazy dog."},
    {"prompt": "Name a color. ", "completion": "Blue"},
    {"prompt": "Hello there, ", "completion": "how are you today?"},
    {"prompt": "eight nine ", "completion": "ten"},
]


def _model(tokenizer, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, attn_implementation=attn,
    )  # fmt: skip
    # train mode with the default use_cache: the setting a training loop runs the model in
    return LlamaForCausalLM(config).train()


def _split_rows(sequence):
    starts = [i for i, p in enumerate(sequence["position_ids"]) if p == 0] + [len(sequence["input_ids"])]
    return list(zip(starts, starts[1:]))


def test_pack_lengths_best_fit_decreasing():
    assert pack_lengths([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]
    lengths = [7, 1, 3, 8, 2, 2, 5, 6, 4, 1]
    bins = pack_lengths(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 5  # 39 tokens need at least 5 bins of 8
    with pytest.raises(ValueError, match="row 1 has length 9; packing needs every length in \\[1, 8\\]"):
        pack_lengths([3, 9], 8)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_and_loss_equal_rows_run_alone(tmp_path, chat_tokenizer, attn):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    packed = prepare(tmp_path, chat_tokenizer, path=path, packing=True, max_length=40)
    plain = prepare(tmp_path, chat_tokenizer, path=path, packing=False, max_length=40)
    assert packed.packed and packed.stats.examples == plain.stats.examples == len(ROWS)
    assert 1 < packed.stats.sequences < len(ROWS) and len(packed.train) == packed.stats.sequences
    assert packed.stats.total_tokens == plain.stats.total_tokens
    assert packed.stats.trained_tokens == plain.stats.trained_tokens

    model = _model(chat_tokenizer, attn)
    batch = packed.collator([packed.train[i] for i in range(len(packed.train))])  # padded: lengths differ
    assert batch["attention_mask"].shape[1:] == (1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    alone = {tuple(r["input_ids"]): r for r in plain.train}
    compared, loss_sum_alone = 0, 0.0
    with torch.no_grad():
        out = model(**batch)
        for s, sequence in enumerate(packed.train):
            for a, b in _split_rows(sequence):
                row = alone[tuple(sequence["input_ids"][a:b])]
                single = model(**plain.collator([row]))
                torch.testing.assert_close(out.logits[s, a:b], single.logits[0], atol=1e-5, rtol=0)
                loss_sum_alone += single.loss.item() * sum(1 for x in row["labels"][1:] if x != IGNORE_INDEX)
                compared += 1
    assert compared == len(ROWS)
    packed_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert packed_targets == packed.stats.trained_tokens
    assert out.loss.item() * packed_targets == pytest.approx(loss_sum_alone, rel=1e-5)


def test_position_ids_only_mode_needs_use_cache_false(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    packed = prepare(tmp_path, chat_tokenizer, path=path, packing=True, max_length=40)
    plain = prepare(tmp_path, chat_tokenizer, path=path, max_length=40)
    collate = make_collator(chat_tokenizer, packed_attention="position_ids")
    sequence = packed.train[0]
    batch = collate([sequence])
    assert "attention_mask" not in batch
    model = _model(chat_tokenizer, "sdpa")
    alone = {tuple(r["input_ids"]): r for r in plain.train}
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        for a, b in _split_rows(sequence):
            row = alone[tuple(sequence["input_ids"][a:b])]
            single = model(input_ids=torch.tensor([row["input_ids"]])).logits
            torch.testing.assert_close(logits[0, a:b], single[0], atol=1e-5, rtol=0)
