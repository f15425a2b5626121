"""File I/O: safetensors only (nothing is unpickled), every write atomic (temp file + rename)."""
from __future__ import annotations

import os

import torch

from ..atomic_files import atomic_replace, atomic_write_text

SAFETENSORS_NAME = "adapter_model.safetensors"


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors (made contiguous, shared storage broken) with PEFT's metadata."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
             for k, v in tensors.items()}
    atomic_replace(path, lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))


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
