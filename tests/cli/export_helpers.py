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



# Small bases of each architecture the GGUF writer supports, beside tests/cli/conftest.py's Llama.
TINY_BASES = {
    # q/k/v biases; llama.cpp's qwen2 graph rotates halves, so rows stay as they are
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # per-head q/k norms
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    # llama.cpp runs Mistral as its llama architecture
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # Llama 3's rope scaling, its original context cut to 16 positions so that the scaled
    # frequencies matter within a short test text (llama.cpp reads them as rope_freqs)
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}}),
}


def save_tiny(kind: str, folder: Path, **overrides) -> str:
    """A 2-layer model of `kind` (a key of TINY_BASES) with the tests' ChatML byte-level tokenizer,
    saved to `folder`; its biases, when it has any, are non-zero so that a dropped or misplaced
    bias shows."""
    import transformers
    from cli_helpers import build_chat_tokenizer

    config_cls, model_cls, extra = TINY_BASES[kind]
    tokenizer = build_chat_tokenizer()
    torch.manual_seed(1)
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    tie_word_embeddings=False, **extra)
    settings.update(overrides)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
