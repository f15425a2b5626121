"""Adapter folders for the export tests: a peftkit adapter with non-trivial weights on a base
model folder, saved without training."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_dir: str, out: Path, seed: int = 0, config=None, **lora) -> Path:
    """Save an adapter (LoRA with `lora` settings unless `config` is given) whose trainable
    tensors are random, so that every exported value is checked against something non-zero."""
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if config is None:
        config = LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=base_dir, **lora)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(out))
    return out


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def gguf_fields(path) -> tuple[dict, dict]:
    """({metadata key: value}, {tensor name: (numpy array in torch order, GGML type name)})."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.data, t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


def interleave_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout written out row by row: within each head, row 2i takes the
    first half's row i and row 2i+1 the second half's row i."""
    per_head = rows.shape[0] // heads
    out = torch.empty_like(rows)
    for h in range(heads):
        for i in range(per_head // 2):
            out[h * per_head + 2 * i] = rows[h * per_head + i]
            out[h * per_head + 2 * i + 1] = rows[h * per_head + per_head // 2 + i]
    return out


def save_qwen2(folder: Path) -> str:
    """A 2-layer Qwen2 (q/k/v biases, no rotary permutation in llama.cpp) with the tests' ChatML
    byte-level tokenizer, saved to `folder`."""
    from cli_helpers import build_chat_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(1)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-zero biases, so that a dropped or permuted bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_llama3_rope(folder: Path) -> str:
    """A 2-layer Llama with Llama 3's rope scaling, its original context cut to 16 positions so
    that the scaled frequencies matter within a short test text."""
    from cli_helpers import build_chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(2)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters=rope)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
