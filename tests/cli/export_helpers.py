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
