"""GGUF files for llama.cpp: a LoRA adapter (loaded with `llama-cli --lora FILE`) and a whole
model, written with the `gguf` package in llama.cpp's tensor names and metadata.

llama.cpp's own converters (convert_lora_to_gguf.py, convert_hf_to_gguf.py) define the layout:
- names come from gguf-py's tensor name map (`model.layers.0.self_attn.q_proj.weight` ->
  `blk.0.attn_q.weight`); an adapter stores `<name>.lora_a` and `<name>.lora_b`;
- an adapter's A is [r, in] and B [out, r] in torch order (GGUF lists dimensions reversed, so
  llama.cpp sees A as ne = [in, r]); for the token embedding A is stored transposed, [vocab, r];
- llama.cpp scales each pair by `adapter.lora.alpha / r` with r read from that pair's B, so
  per-module ranks need nothing, and any other scale (rsLoRA, alpha_pattern) is folded into B;
- the LLAMA graph rotates interleaved pairs where transformers rotates halves, so the output rows
  of q_proj / k_proj (weights, biases, and LoRA B) are permuted for that architecture.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..atomic_files import atomic_replace

INSTALL_HINT = "pip install 'peftkit[gguf]'"
GGUF_DTYPES = ("f32", "f16", "bf16")


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError(f"GGUF export needs the `gguf` package, which is not installed: {INSTALL_HINT}") from None
    return gguf


@dataclass(frozen=True)
class GgufArch:
    name: str  # llama.cpp's general.architecture
    permute_qk: bool  # rotary embedding on interleaved pairs (see the module docstring)


# transformers model_type -> llama.cpp architecture, as convert_hf_to_gguf.py maps them.
ARCHITECTURES = {
    "llama": GgufArch("llama", True),
    "mistral": GgufArch("llama", True),
    "qwen2": GgufArch("qwen2", False),
    "qwen3": GgufArch("qwen3", False),
}


def gguf_arch(config: Any) -> GgufArch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export does not support model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def tensor_namer(config: Any) -> Callable[[str], str | None]:
    """transformers parameter name (`...q_proj.weight` / `.bias`) -> GGUF name, None if unknown."""
    gguf = import_gguf()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch(config).name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    return lambda hf_name: names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_rows(config: Any, hf_name: str, rows: torch.Tensor) -> torch.Tensor:
    """`rows` ([out, ...]: a q/k weight, bias or LoRA B) in llama.cpp's rotary layout."""
    if not gguf_arch(config).permute_qk:
        return rows
    if ".q_proj." in hf_name:
        heads = config.num_attention_heads
    elif ".k_proj." in hf_name:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass
class LoraPair:
    """One adapted module: A [r, in] and B [out, r] (embedding: A [r, vocab], B [dim, r]) with
    the scale folded into B relative to llama.cpp's `alpha / r`."""

    module: str  # transformers module path, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor
    b: torch.Tensor
    embedding: bool = False


def llama_cpp_scale(alpha: float, r: int) -> float:
    """The scale llama.cpp applies to a pair of rank r (llama-adapter.h, get_scale)."""
    return alpha / r if alpha else 1.0


def write_lora_gguf(path: str, config: Any, pairs: Iterable[LoraPair], *, alpha: float, dtype: str = "f32",
                    name: str | None = None) -> list[str]:
    """Write an adapter GGUF for the base model described by `config` (a transformers config);
    returns the tensor names written. Every pair's module must have a GGUF name (callers check
    with `tensor_namer` first, to report all unsupported modules at once)."""
    gguf = import_gguf()
    namer = tensor_namer(config)
    tensors = []
    for pair in pairs:
        target = namer(pair.module + ".weight")
        if target is None:
            raise ValueError(f"module {pair.module} has no llama.cpp tensor name for {gguf_arch(config).name}")
        a, b = pair.a.float(), pair.b.float()
        if pair.embedding:
            a = a.T  # llama.cpp gathers rows of A for the token ids (llm_build_inp_embd)
        else:
            b = rotary_rows(config, pair.module + ".weight", b)
        tensors += [(target + ".lora_a", a), (target + ".lora_b", b)]

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for tensor_name, tensor in tensors:
            _add_tensor(gguf, writer, tensor_name, tensor, dtype)

    _write(path, gguf_arch(config).name, name, fill)
    return [n for n, _ in tensors]


def write_model_gguf(path: str, config: Any, state: dict[str, torch.Tensor], *, dtype: str = "f16",
                     vocab: Callable[[Any], None] | None = None, name: str | None = None) -> list[str]:
    """Write a whole model (its transformers `state` dict and `config`) as a GGUF file that
    llama.cpp runs; `vocab(writer)` adds the tokenizer. Returns the tensor names written."""
    gguf = import_gguf()
    rope = _rope(config)
    namer = tensor_namer(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors, unknown = [], []
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the output layer reuses token_embd
        target = namer(hf_name)
        if target is None:
            unknown.append(hf_name)
            continue
        tensors.append((target, rotary_rows(config, hf_name, tensor.float())))
    if unknown:
        raise ValueError(f"GGUF export: these {gguf_arch(config).name} weights have no llama.cpp name: "
                         f"{', '.join(unknown)}")
    if rope.get("rope_type") == "llama3":
        rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        tensors.append((rope_freqs, _llama3_rope_factors(config, rope)))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[check_dtype(dtype)]

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        _add_hparams(gguf, writer, config, rope)
        writer.add_file_type(file_type)
        if vocab is not None:
            vocab(writer)
        for tensor_name, tensor in tensors:
            # llama.cpp keeps vectors and norms in f32 whatever the file type (convert_hf_to_gguf.py)
            keep_f32 = tensor.dim() <= 1 or tensor_name.endswith("_norm.weight")
            _add_tensor(gguf, writer, tensor_name, tensor, "f32" if keep_f32 else dtype)

    _write(path, gguf_arch(config).name, name, fill)
    return [n for n, _ in tensors]


def check_dtype(dtype: str) -> str:
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not accepted; accepted: {', '.join(GGUF_DTYPES)}")
    return dtype


def _add_tensor(gguf: Any, writer: Any, name: str, tensor: torch.Tensor, dtype: str) -> None:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if check_dtype(dtype) == "f16":
        writer.add_tensor(name, data.astype("float16"))
    elif dtype == "bf16":
        qtype = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data)


def _write(path: str, arch: str, name: str | None, fill: Callable[[Any], None]) -> None:
    gguf = import_gguf()
    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a folder; give a file name for the GGUF file, e.g. {path}/model.gguf")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or os.path.splitext(os.path.basename(path))[0])
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_replace(path, write)


def _rope(config: Any) -> dict:
    """The rope settings (transformers 5: `rope_parameters`; 4: `rope_scaling` + `rope_theta`);
    refuses scalings llama.cpp's architectures here do not take from this writer."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = kind
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"GGUF export: rope_type {kind!r} is not supported by this writer; supported: default, "
                         f"linear, llama3")
    return params


def _add_hparams(gguf: Any, writer: Any, config: Any, rope: dict) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _llama3_rope_factors(config: Any, rope: dict) -> torch.Tensor:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp reads them as rope_freqs)."""
    dim = head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
