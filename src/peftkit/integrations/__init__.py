"""Training peftkit models with other libraries' loops (transformers.Trainer).

Accelerate and plain PyTorch loops need nothing from here: a PeftModel is an nn.Module whose
only trainable parameters are the adapter's, and `save_pretrained` writes the adapter.
"""
from .trainer import CheckpointMismatchError, Trainer, has_adapter_files, load_adapters_in_place

PeftTrainer = Trainer

__all__ = ["Trainer", "PeftTrainer", "CheckpointMismatchError", "has_adapter_files", "load_adapters_in_place"]
