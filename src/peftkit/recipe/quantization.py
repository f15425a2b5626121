"""Quantized bases (QLoRA): the YAML `model.quantization` section, loading a model with its
linear layers in 4 or 8 bits (bitsandbytes, as transformers' `BitsAndBytesConfig` does, or
torchao's NF4 tensor), giving back the memory loading used, and peft's
`prepare_model_for_kbit_training`.

Adapters on these layers are the methods' own business (`methods.quantized_base`); this module
only makes and prepares the base.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..methods import quantized_base

BACKENDS = ("bitsandbytes", "torchao")
FOUR_BIT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class QuantizationConfig:
    """The `model.quantization:` section.

    bits:          4 or 8 (8: bitsandbytes only).
    type:          4-bit data type: nf4 (QLoRA's) or fp4 (bitsandbytes only).
    double_quant:  quantize the 4-bit block scales too (~0.4 bit/parameter less; bitsandbytes).
    compute_dtype: dtype the layers dequantize to and multiply in: auto (the model's dtype), fp32, bf16, fp16.
    backend:       bitsandbytes (transformers' BitsAndBytesConfig) or torchao (NF4 tensors, torchtune's QLoRA).
    block_size:    weights per 4-bit scale (64 as both libraries default).
    """

    bits: int = 4
    type: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "auto"
    backend: str = "bitsandbytes"
    block_size: int = 64

    @classmethod
    def from_dict(cls, values: Any, section: str = "model.quantization") -> tuple["QuantizationConfig", list[str]]:
        """The config and its problems (each naming the key); unknown keys are problems."""
        if not isinstance(values, dict):
            return cls(), [f"{section}: {values!r} is not a mapping; give keys such as bits: 4, type: nf4"]
        names = [f.name for f in fields(cls)]
        problems = [f"{section}.{key}: unknown key; accepted: {', '.join(names)}" for key in values if key not in names]
        config = cls(**{k: v for k, v in values.items() if k in names})
        problems += [f"{section}.{p}" for p in config.problems()]
        if not problems:  # settings the chosen backend would not apply are refused, not dropped
            problems += [f"{section}.{p}" for p in config.unused_settings(set(values))]
        return config, problems

    def problems(self) -> list[str]:
        out = []
        if self.backend not in BACKENDS:
            out.append(f"backend: {self.backend!r} is not accepted; accepted: {', '.join(BACKENDS)}")
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            out.append(f"bits: {self.bits!r} is not accepted; accepted: 4, 8")
        elif self.bits == 8 and self.backend == "torchao":
            out.append("bits: 8 needs backend: bitsandbytes (torchao's NF4 is 4-bit)")
        if self.type not in FOUR_BIT_TYPES:
            out.append(f"type: {self.type!r} is not accepted; accepted: {', '.join(FOUR_BIT_TYPES)}")
        elif self.type == "fp4" and self.backend == "torchao":
            out.append("type: fp4 needs backend: bitsandbytes (torchao's 4-bit type is nf4)")
        if not isinstance(self.double_quant, bool):
            out.append(f"double_quant: {self.double_quant!r} is not a boolean; use true or false")
        if self.compute_dtype not in COMPUTE_DTYPES:
            out.append(f"compute_dtype: {self.compute_dtype!r} is not accepted; accepted: {', '.join(COMPUTE_DTYPES)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size not in (
                32, 64, 128, 256, 512, 1024, 2048, 4096):
            out.append(f"block_size: {self.block_size!r} is not accepted; accepted: a power of two from 32 to 4096")
        return out

    def unused_settings(self, given: set[str]) -> list[str]:
        """Settings given that the chosen bits / backend has no use for."""
        out = []
        if self.bits == 8:
            out += [f"{key}: applies to 4-bit only (8-bit: bitsandbytes' LLM.int8 with its own fp16 compute)"
                    for key in ("type", "double_quant", "compute_dtype", "block_size") if key in given]
        elif self.backend == "bitsandbytes" and self.block_size != 64:
            out.append(f"block_size: {self.block_size} needs backend: torchao (bitsandbytes' 4-bit blocks are 64, "
                       "as transformers' BitsAndBytesConfig sets them)")
        if self.backend == "torchao" and self.double_quant:
            out.append("double_quant: true needs backend: bitsandbytes (torchao's NF4 always quantizes its scales)")
        return out

    def resolved_compute_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype] or model_dtype

    def bytes_per_weight(self) -> float:
        """Storage per quantized weight, block scales included (for size estimates)."""
        if self.bits == 8:
            return 1.0  # + one fp32 scale per row, negligible
        scales = 1 / self.block_size + 4 / (256 * self.block_size) if self.double_quant else 4 / self.block_size
        return 0.5 + scales


def _quantization_config(config: QuantizationConfig, model_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if config.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.type,
                              bnb_4bit_use_double_quant=config.double_quant,
                              bnb_4bit_compute_dtype=config.resolved_compute_dtype(model_dtype))


@contextlib.contextmanager
def quiet_backend_import() -> Iterator[None]:
    """bitsandbytes and torchao log at import what this machine lacks (GPU kernels, a hub kernel it
    could not fetch): noise for a user who asked for the CPU. Their loggers are muted meanwhile."""
    names = ("bitsandbytes", "torchao", "torch.utils._pytree")
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _require(backend: str) -> None:
    module = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}[backend]
    try:
        with quiet_backend_import():
            __import__(module)
            if backend == "torchao":
                import torchao.quantization  # noqa: F401  (registers the NF4 tensor)
    except ImportError:
        raise ImportError(f"model.quantization.backend: {backend} needs the {module} package: "
                          f"pip install 'peftkit[quantization]'") from None


def load_quantized_model(path: str, quantization: QuantizationConfig | dict, *, model_class: Any = None,
                         dtype: torch.dtype = torch.bfloat16, return_freed_buffers: bool = True,
                         **from_pretrained_kwargs: Any) -> nn.Module:
    """A pretrained model with its linear layers quantized (the output head and embeddings stay
    in `dtype`), loaded without holding the unquantized checkpoint: from a local safetensors
    folder each weight is read, quantized and freed in turn.

    `return_freed_buffers`: without a GPU, call `return_freed_buffers_to_system()` first
    (process-wide, glibc only); False leaves the allocator as it is.
    `model_class`: a transformers Auto class (default AutoModelForCausalLM); other keywords go to
    its `from_pretrained` (trust_remote_code, num_labels, ...).
    """
    if isinstance(quantization, dict):
        quantization, problems = QuantizationConfig.from_dict(quantization, "quantization")
        if problems:
            raise ValueError("; ".join(problems))
    elif problems := quantization.problems():
        raise ValueError("; ".join(f"quantization.{p}" for p in problems))
    _require(quantization.backend)
    if return_freed_buffers and not torch.cuda.is_available():
        return_freed_buffers_to_system()
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    for key in ("quantization_config", "dtype", "torch_dtype"):
        if key in from_pretrained_kwargs:
            raise TypeError(f"load_quantized_model: pass {key!r} through `quantization` / `dtype`, not as a keyword")
    kwargs = dict(from_pretrained_kwargs, dtype=dtype)
    if quantization.backend == "bitsandbytes":
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
        kwargs.setdefault("device_map", "cuda" if torch.cuda.is_available() else "cpu")
        shards = _safetensors_shards(path, from_pretrained_kwargs)
        with quiet_backend_import():
            if shards:
                return _load_reading_quantized_weights(path, shards, model_class, kwargs)
            model = model_class.from_pretrained(path, **kwargs)
    else:
        model = model_class.from_pretrained(path, **kwargs)
        if torch.cuda.is_available():
            model = model.to("cuda")
        quantize_nf4(model, block_size=quantization.block_size,
                     compute_dtype=quantization.resolved_compute_dtype(dtype))
    release_loading_memory(model)
    return model


def _safetensors_shards(path: str, kwargs: dict) -> list[str]:
    """The safetensors files of a local model folder, or [] where transformers must find the
    weights itself (a hub id, .bin files, or keywords that choose other files)."""
    if any(key in kwargs for key in ("subfolder", "revision", "use_safetensors", "gguf_file", "state_dict", "config",
                                     "output_loading_info", "disable_mmap")):
        return []
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # anything unexpected in it: transformers reads it and says what is wrong
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
        return [str(folder / n) for n in shards] if shards and all((folder / n).is_file() for n in shards) else []
    single = folder / "model.safetensors"
    return [str(single)] if single.is_file() else []


def _load_reading_quantized_weights(path: str, shards: list[str], model_class: Any, kwargs: dict) -> nn.Module:
    """transformers' quantizing load, fed the checkpoint by us: each weight it quantizes is read
    into its own buffer (safetensors' pread), freed once quantized, instead of through a memory map
    of the whole file: through a map every page that quantization read stays resident until
    loading ends, so loading peaked at the bf16 size plus the 4-bit copy. The weights that stay
    unquantized (embeddings, norms, head) remain views of the map as in any transformers load: an
    embedding row nobody looks up costs nothing."""
    from safetensors import safe_open
    from transformers import AutoConfig

    user_kwargs = {k: v for k, v in kwargs.items() if k not in ("dtype", "quantization_config", "device_map")}
    trust = user_kwargs.pop("trust_remote_code", False)
    # the split transformers' from_pretrained makes: config keywords to the config, the rest to the model
    config, model_kwargs = AutoConfig.from_pretrained(path, return_unused_kwargs=True, trust_remote_code=trust,
                                                      **user_kwargs)
    with torch.device("meta"):
        skeleton = (model_class.from_config(config, trust_remote_code=trust) if hasattr(model_class, "from_config")
                    else model_class(config))  # an Auto class, or a model class itself
    head = skeleton.get_output_embeddings()
    to_quantize = {f"{name}.weight" for name, module in skeleton.named_modules()
                   if isinstance(module, nn.Linear) and module is not head}
    concrete_class = type(skeleton)  # an Auto class would deep-copy the state dict's file handles
    del skeleton
    pread = True
    with contextlib.ExitStack() as files:
        state_dict = {}
        for shard in shards:
            mapped = files.enter_context(safe_open(shard, framework="pt"))
            read = _pread_file(shard, files)
            pread = pread and read is not None
            for key in mapped.keys():
                state_dict[key] = (read if read is not None and key in to_quantize else mapped).get_slice(key)
        model = concrete_class.from_pretrained(
            None, config=config, state_dict=state_dict, trust_remote_code=trust,
            dtype=kwargs["dtype"], quantization_config=kwargs["quantization_config"],
            device_map=kwargs["device_map"], **model_kwargs)
        del state_dict
    if not pread:  # every weight came through the map: copy the rest off it (release_loading_memory)
        release_loading_memory(model)
    # what from_pretrained takes from the folder when given one instead of a state dict
    model.config._name_or_path = model.name_or_path = str(path)
    if model.can_generate() and (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    gc.collect()
    _trim_allocator()
    return model


def _pread_file(shard: str, files: contextlib.ExitStack) -> Any:
    """The shard opened with safetensors' pread backend, or None where the installed safetensors
    has none (its weights are then read through the map, as transformers does)."""
    from safetensors import safe_open

    try:
        return files.enter_context(safe_open(shard, framework="pt", backend="pread"))
    except TypeError:
        return None


def return_freed_buffers_to_system(threshold: int = 1 << 20) -> bool:
    """Make glibc's malloc give every freed buffer of `threshold` bytes or more straight back to
    the system (mallopt M_MMAP_THRESHOLD), for the rest of this process. False where the C library
    is not glibc.

    Why: glibc keeps freed buffers of up to 32 MiB for reuse by default. A quantized base frees
    many such buffers of mixed sizes (checkpoint reads while loading, the dequantized weight rows
    of every layer in every pass), and the heap they leave holes in grew by ~160 MB over a 0.44B
    model's training steps, a third of what the 4-bit base saves (benchmarks/quantized.py). The
    cost: a buffer that size is mapped afresh each time (measured: no slower per step there)."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    return False


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _trim_allocator() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def quantize_nf4(model: nn.Module, block_size: int = 64, compute_dtype: torch.dtype | None = None,
                 skip: tuple[str, ...] | None = None) -> list[str]:
    """torchao backend: every nn.Linear weight of `model` (except the output head and `skip`)
    becomes a frozen NF4 tensor, in place. The layer then computes in `compute_dtype` (default:
    the weight's dtype). Returns the quantized paths."""
    _require("torchao")
    from torchao.quantization import to_nf4

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = tuple(skip or ())
    done = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head or (skip and name.endswith(skip)):
            continue
        if quantized_base.is_quantized(module):
            continue
        weight = module.weight.detach()
        if compute_dtype is not None:
            weight = weight.to(compute_dtype)
        # torchao splits the scales in groups of this size: use the largest that divides the blocks
        blocks = weight.numel() // block_size
        scaler_block = next(s for s in (256, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % s == 0)
        module.weight = nn.Parameter(to_nf4(weight.contiguous(), block_size, scaler_block), requires_grad=False)
        if module.bias is not None and compute_dtype is not None:
            module.bias = nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        done.append(name)
    return done


def release_loading_memory(model: nn.Module) -> None:
    """Give back what loading a quantized model held on to: the checkpoint stays memory-mapped
    while any tensor still views it (the unquantized embeddings, norms and head do), which keeps
    every page quantization read resident (a bf16 file's size); and the allocator keeps the
    quantization's temporaries. Those tensors get their own copies, and the C allocator trims."""
    with torch.no_grad():
        for module in model.modules():
            if quantized_base.is_quantized(module):
                names = [n for n, _ in module.named_parameters(recurse=False) if n != "weight"]
            else:
                names = [n for n, _ in module.named_parameters(recurse=False)]
            for name in names:
                param = getattr(module, name)
                param.data = param.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    gc.collect()
    _trim_allocator()


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """peft's function of this name, with its behaviour: freeze every parameter; cast the fp16/bf16
    parameters that are not quantized (norms, embeddings, head) to fp32; with gradient
    checkpointing, make the inputs require grad (reentrant checkpointing needs it) and turn it on.

    Costs memory: an fp32 copy of the embeddings and head. peftkit's own loading and loop do not
    call it (frozen bf16 norms train as well on CPU and GPU); it is here for peft's recipes.
    """
    # transformers' default, said explicitly (torch warns when checkpoint() is not told)
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
    for param in model.parameters():
        param.requires_grad_(False)
    quantized_params = {id(p) for m in model.modules() if quantized_base.is_quantized(m) for p in m.parameters()}
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in quantized_params:
            param.data = param.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if use_gradient_checkpointing and quantized_params:
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def base_memory(model: nn.Module, quantization: QuantizationConfig | None, element_bytes: float) -> tuple[int, int]:
    """(bytes of the weights unquantized, bytes once quantized) for a model built on the meta
    device, its weights `element_bytes` each: the linear layers except the output head are
    quantized (as transformers and `quantize_nf4` do), everything else stays."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain = quantized = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            size = int(param.numel() * element_bytes)
            plain += size
            if quantization is not None and type(module) is nn.Linear and module is not head and param.dim() == 2:
                quantized += int(param.numel() * quantization.bytes_per_weight())
            else:
                quantized += size
    return plain, quantized
