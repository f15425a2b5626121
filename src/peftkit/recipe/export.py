"""`peftkit export ADAPTER --to gguf | gguf-merged`: an adapter folder as llama.cpp files.

`gguf`: the adapter alone, as a GGUF LoRA file (`llama-cli -m base.gguf --lora adapter.gguf`);
`gguf-merged`: the adapter folded into its base, one GGUF model file with the tokenizer.
Everything llama.cpp cannot load is refused up front, each problem named on its own line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.export import first_nonfinite, merged_model
from ..checkpoint.gguf import (ARCHITECTURES, LoraPair, check_dtype, gguf_arch, import_gguf, llama_cpp_scale,
                               tensor_namer, write_lora_gguf, write_model_gguf)
from ..checkpoint.gguf_vocab import vocab_writer
from ..config import PeftConfig
from ..injection import adapter_layers
from ..methods.lora import Embedding as LoraEmbedding
from ..methods.lora import Linear as LoraLinear
from .loading import LoadError, load_adapter

EXPORT_FORMATS = ("gguf", "gguf-merged")
DEFAULT_DTYPE = {"gguf": "f32", "gguf-merged": "f16"}


class ExportError(ValueError):
    """The adapter cannot be exported in the asked format; one line per reason."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ExportReport:
    out: str
    format: str
    dtype: str
    tensors: int
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        kind = "LoRA adapter" if self.format == "gguf" else "merged model"
        lines = [f"GGUF {kind} written to {self.out} ({self.tensors} tensors, {self.dtype})"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def export_adapter(adapter_dir: str, to: str, out: str, *, base: str | None = None,
                   dtype: str | None = None) -> ExportReport:
    """Write `adapter_dir` as `to` (one of EXPORT_FORMATS) to the file `out`.

    base: the base model (default: the adapter's base_model_name_or_path). dtype: f32 / f16 /
    bf16 (default f32 for an adapter, f16 for a merged model).
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"--to {to!r} is not an export format; accepted: {', '.join(EXPORT_FORMATS)}")
    dtype = check_dtype(dtype or DEFAULT_DTYPE[to])
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a folder; give a file name for the GGUF file, e.g. {out}/model.gguf")
    import_gguf()  # a missing package is said before the model is loaded
    if to == "gguf":
        return _export_lora(adapter_dir, out, base, dtype)
    return _export_merged(adapter_dir, out, base, dtype)


def _base_config(adapter_dir: str, peft_config: PeftConfig, base: str | None) -> Any:
    from transformers import AutoConfig

    path = base or peft_config.base_model_name_or_path
    if not path:
        raise LoadError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; pass --base MODEL")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read the base model's config at {path!r}: {exc}") from None


def lora_gguf_problems(peft_config: PeftConfig, base_config: Any) -> list[str]:
    """What in the adapter's config llama.cpp's LoRA loader cannot take (empty: nothing)."""
    problems = []
    if peft_config.peft_type != "LORA":
        problems.append(f"method {peft_config.peft_type}: llama.cpp loads LoRA adapters only")
    if getattr(peft_config, "use_dora", False):
        problems.append("DoRA (use_dora=true): llama.cpp has no magnitude vector; merge it and use --to gguf-merged")
    if getattr(peft_config, "modules_to_save", None):
        problems.append(f"modules_to_save {peft_config.modules_to_save}: llama.cpp adapters hold no whole-module "
                        f"copies; use --to gguf-merged")
    if getattr(peft_config, "bias", "none") != "none":
        problems.append(f"bias={peft_config.bias!r}: llama.cpp adapters hold no bias terms; use --to gguf-merged")
    task = getattr(peft_config, "task_type", None)
    if task not in (None, "", "CAUSAL_LM"):
        problems.append(f"task_type {task}: llama.cpp runs causal language models only")
    if getattr(base_config, "model_type", None) not in ARCHITECTURES:
        problems.append(f"base architecture {getattr(base_config, 'model_type', None)!r}: supported "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    return problems


def _export_lora(adapter_dir: str, out: str, base: str | None, dtype: str) -> ExportReport:
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    base_config = _base_config(adapter_dir, peft_config, base)
    problems = lora_gguf_problems(peft_config, base_config)
    if problems:
        raise ExportError(f"{adapter_dir} cannot be written as a llama.cpp LoRA GGUF", problems)
    loaded = load_adapter(adapter_dir, base, dtype="fp32")
    model = loaded.model
    name = model.active_adapters[0]
    alpha = float(model.peft_config[name].lora_alpha)
    namer = tensor_namer(base_config)
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    pairs, problems, folded = [], [], 0
    for path, layer in adapter_layers(model.get_base_model()):
        if isinstance(layer, LoraEmbedding):
            a, b, embedding = layer.lora_embedding_A[name], layer.lora_embedding_B[name], True
        elif isinstance(layer, LoraLinear) and not layer.fan_in_fan_out:
            a, b, embedding = layer.lora_A[name].weight, layer.lora_B[name].weight, False
        else:
            problems.append(f"module {path}: {type(layer).__name__} over {type(layer.base_layer).__name__} is not a "
                            f"layer llama.cpp adapts")
            continue
        target = namer(path + ".weight")
        if target is None:
            problems.append(f"module {path}: llama.cpp's {gguf_arch(base_config).name} graph has no tensor for it")
            continue
        if tied and target.startswith("output."):
            problems.append(f"module {path}: the base ties lm_head to the embeddings, llama.cpp ignores lm_head "
                            f"adapters then")
            continue
        r = a.shape[0]
        fold = layer.scaling[name] / llama_cpp_scale(alpha, r)
        folded += abs(fold - 1.0) > 1e-7
        pairs.append(LoraPair(path, a.detach(), b.detach() * fold, embedding))
    if problems:
        raise ExportError(f"{adapter_dir} cannot be written as a llama.cpp LoRA GGUF", problems)
    bad = first_nonfinite((f"{p.module} lora_{x}", t) for p in pairs for x, t in (("A", p.a), ("B", p.b)))
    if bad:
        raise ExportError(f"{adapter_dir} cannot be exported", [f"non-finite values in {bad}"])
    written = write_lora_gguf(out, base_config, pairs, alpha=alpha, dtype=dtype,
                              name=os.path.basename(os.path.normpath(adapter_dir)))
    notes = []
    if folded:
        notes.append(f"{folded} module(s) scale differently from lora_alpha / r (rsLoRA or alpha_pattern): their "
                     f"scale is folded into lora_b")
    return ExportReport(out, "gguf", dtype, len(written), notes)


def _export_merged(adapter_dir: str, out: str, base: str | None, dtype: str) -> ExportReport:
    gguf_arch(_base_config(adapter_dir, PeftConfig.from_pretrained(adapter_dir), base))  # before any weights load
    loaded = load_adapter(adapter_dir, base, dtype="fp32")
    if loaded.task != "causal-lm":
        raise ExportError(f"{adapter_dir} cannot be written as a llama.cpp model",
                          [f"task {loaded.task}: llama.cpp runs causal language models only"])
    if loaded.tokenizer is None:
        raise ExportError(f"{adapter_dir} cannot be written as a llama.cpp model",
                          ["no tokenizer beside the adapter or the base: a GGUF model carries its vocabulary"])
    written = model_to_gguf(loaded.model, loaded.tokenizer, out, dtype=dtype,
                            name=os.path.basename(os.path.normpath(adapter_dir)))
    return ExportReport(out, "gguf-merged", dtype, written)


def model_to_gguf(model: Any, tokenizer: Any, out: str, *, dtype: str = "f16", name: str | None = None) -> int:
    """Write a causal LM (a transformers model, or a PeftModel whose active adapter is merged
    in, consuming it) with its tokenizer as one GGUF file llama.cpp runs; returns the tensor
    count. Refuses unsupported architectures, rope scalings and tokenizers before merging."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    gguf_arch(config)
    vocab = vocab_writer(tokenizer, config.vocab_size)
    plain = merged_model(model) if hasattr(model, "merge_and_unload") else model
    with torch.no_grad():
        state = plain.state_dict()
    bad = first_nonfinite(state.items())
    if bad:
        raise ValueError(f"the model weight {bad} is not finite; nothing was written")
    return len(write_model_gguf(out, plain.config, state, dtype=dtype, vocab=vocab, name=name))
