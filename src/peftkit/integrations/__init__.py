"""Training peftkit models with other libraries' loops (transformers.Trainer, TRL's SFTTrainer).

Accelerate and plain PyTorch loops need nothing from here: a PeftModel is an nn.Module whose
only trainable parameters are the adapter's, and `save_pretrained` writes the adapter.
"""
from .trainer import CheckpointMismatchError, Trainer, has_adapter_files, load_adapters_in_place

PeftTrainer = Trainer


def __getattr__(name: str):
    # TRL is optional: imported only when its trainer is asked for.
    if name == "SFTTrainer":
        from .trl import SFTTrainer

        return SFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Trainer", "PeftTrainer", "CheckpointMismatchError", "has_adapter_files", "load_adapters_in_place"]
