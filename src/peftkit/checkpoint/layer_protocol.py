"""What the on-disk contract needs from an adapter layer, so that checkpoint/ never imports
methods/ (a layer above it): `methods.base.AdapterLayer` derives from this class, and the key
translation finds adapter layers by this type."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn


class SavedAdapterLayer(nn.Module):
    """A module wrapping `base_layer` that saves and loads per-adapter tensors under local keys."""

    base_layer: nn.Module
    # True for a trained copy of a whole module (modules_to_save), saved under the module's own
    # keys: its biases are its own, not the base layer's.
    saves_whole_module: ClassVar[bool] = False

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under their local PEFT keys (adapter name removed)."""
        raise NotImplementedError

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str) -> list[str]:
        """Copy `state` (local keys) into adapter `name` in place; returns the missing local keys.
        `where` is the module path, for error messages."""
        raise NotImplementedError
