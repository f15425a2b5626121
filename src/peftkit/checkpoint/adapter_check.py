"""Checks on a saved adapter, made before anything is allocated and after its tensors are read.

The safetensors header (names, dtypes, shapes; no data) is read first, so that an empty file,
an integer or bool tensor, or an adapter_config.json whose sizes cannot match the file (`r: 1e9`
would allocate the adapter before the first shape check) is refused in a fraction of a second.
The data is then checked for NaN / Inf, which would otherwise load silently and give `nan`
outputs; `check_finite=False` lets a user load a broken file to look at it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

# safetensors' dtype names for floating-point tensors (the only kind an adapter holds).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
# Config fields that set how big the adapter's tensors are.
SIZE_FIELDS = ("r", "num_virtual_tokens", "token_dim", "encoder_hidden_size", "num_layers", "num_attention_heads",
               "num_transformer_submodules")
# A field that sets no tensor size for this method: LoKr stores whole factors when r is large.
_NOT_A_SIZE = {"LOKR": {"r"}}
NONFINITE_HINT = "Pass check_finite=False (CLI: --allow-nonfinite) to load it anyway for inspection"

Header = dict[str, tuple[str, tuple[int, ...]]]


class AdapterFileError(ValueError):
    """A saved adapter whose config or tensors cannot be loaded as they are; the message says which."""


def read_header(path: str) -> Header:
    """{tensor name: (safetensors dtype name, shape)} from the file's header, without its data."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Adapter weights not found: {path!r} (expected adapter_model.safetensors)")
    try:
        with safe_open(path, framework="pt") as fh:
            return {key: (str(fh.get_slice(key).get_dtype()), tuple(fh.get_slice(key).get_shape()))
                    for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path!r} is not a readable safetensors file ({exc}); the file is corrupt or "
                               "truncated — re-save or re-download the adapter") from None


def check_header(path: str, header: Header) -> None:
    """Refuse a file without tensors, or with tensors that are not floating point."""
    if not header:
        raise AdapterFileError(f"{path} holds no tensors: it is not a trained adapter (was it saved before "
                               "the adapter was added, or emptied?)")
    bad = [f"{key} ({dtype})" for key, (dtype, _) in sorted(header.items()) if dtype not in FLOAT_DTYPES]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise AdapterFileError(f"{path}: adapter tensors must be floating point (F16, BF16, F32, F64); "
                               f"found {shown}")


def check_sizes(config: Any, header: Header, config_path: str, weights_path: str) -> None:
    """Refuse a config whose size fields exceed every dimension of the saved tensors: such an
    adapter cannot be the one the file holds, and building it first could need any amount of
    memory (a rank of 10^9 on a small model is hundreds of GB)."""
    dims = [d for _, shape in header.values() if math.prod(shape) > 0 for d in shape]
    bound = max(dims, default=0)
    exempt = _NOT_A_SIZE.get(str(getattr(config, "peft_type", "")), set())
    sizes = [(name, getattr(config, name, None)) for name in SIZE_FIELDS if name not in exempt]
    if "r" not in exempt:
        sizes += [(f"rank_pattern[{k!r}]", v) for k, v in (getattr(config, "rank_pattern", None) or {}).items()]
    for name, value in sizes:
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise AdapterFileError(
                f"{config_path}: {name}={value} is larger than every dimension of the tensors in {weights_path} "
                f"(largest: {bound}), so it cannot describe them; refused before allocating the adapter. "
                "Fix the value, or use the adapter_config.json saved with these weights")


def check_finite(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Refuse NaN / Inf values, naming the first tensors that hold them."""
    bad = []
    for key in sorted(state):
        tensor = state[key]
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{key} ({count} of {tensor.numel()} values)")
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
        raise AdapterFileError(f"{path} holds NaN or Inf values: {shown}; the adapter is broken (a diverged "
                               f"run?). {NONFINITE_HINT}")


def read_checked_adapter(folder: str, config: Any, check_finite_values: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in `folder` (described by its loaded `config`), after the
    header checks, the size check and (unless turned off) the NaN / Inf check."""
    from .io import SAFETENSORS_NAME, read_safetensors

    weights = os.path.join(folder, SAFETENSORS_NAME)
    header = read_header(weights)
    check_header(weights, header)
    check_sizes(config, header, os.path.join(folder, "adapter_config.json"), weights)
    state = read_safetensors(weights)
    if check_finite_values:
        check_finite(state, weights)
    return state
