"""File I/O: safetensors only (nothing is unpickled), every write atomic (temp file + rename)."""
from __future__ import annotations

import os

import torch

from ..atomic_files import atomic_replace, atomic_write_text

SAFETENSORS_NAME = "adapter_model.safetensors"


def adapter_folder(save_directory: str, adapter_name: str) -> str:
    """The folder of adapter `adapter_name` under `save_directory` (PEFT's layout: "default" in it,
    any other in a sub-folder of that name). A name that would leave the folder is refused."""
    check_adapter_name(adapter_name)
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def check_adapter_name(adapter_name: object) -> None:
    """An adapter name becomes a folder name: a plain non-empty name, no path in it."""
    bad = (not isinstance(adapter_name, str) or not adapter_name or adapter_name in (".", "..")
           or any(ch in adapter_name for ch in "/\\\0") or os.path.isabs(adapter_name)
           or adapter_name != adapter_name.strip())
    if bad:
        raise ValueError(f"adapter_name={adapter_name!r} cannot be an adapter name: it becomes a sub-folder of the "
                         "save folder, so it must be a plain name (no '/', '\\', '..', absolute path or "
                         "surrounding spaces), e.g. 'default' or 'sql_v2'")


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors (made contiguous, shared storage broken) with PEFT's metadata."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
             for k, v in tensors.items()}
    atomic_replace(path, lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}),
                   needed_bytes=sum(t.numel() * t.element_size() for t in clean.values()))


def _shares_storage(tensor: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return sum(1 for t in tensors.values() if t.untyped_storage().data_ptr() == ptr) > 1


def read_safetensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Adapter weights not found: {path!r} (expected {SAFETENSORS_NAME})")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file ({exc}); the file is corrupt or "
                         f"truncated — re-save or re-download the adapter") from None
