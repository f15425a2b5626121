"""`TunerModel`: where peft's `LoraModel` (and IA3Model, ...) sits in the module tree.

peft's `PeftModel.base_model` is such a tuner and its `.model` the transformers model, so
parameter names read `base_model.model.model.layers.0...`. peftkit keeps the same tree so that
code written for peft (navigating `model.base_model.model`, building optimizer groups or FSDP
wrap policies from parameter names, loading a `PeftModel.state_dict()` saved with peft) runs
unchanged. Prompt-learning models have no tuner in peft either: there `base_model` is the
transformers model itself.
"""
from __future__ import annotations

import torch.nn as nn


class TunerModel(nn.Module):
    """Holds the adapted model as `.model`; calls and attribute reads fall through to it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
