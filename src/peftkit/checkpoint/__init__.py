"""The on-disk contract: PEFT key names, safetensors I/O, merged-model export."""
from .io import SAFETENSORS_NAME, atomic_write_text, read_safetensors, write_safetensors
from .keys import (LoadReport, collect_adapter_state, copy_checked, collect_prompt_learning_state, load_adapter_weights,
                   load_prompt_learning_weights, trained_bias_params)
from .layer_protocol import SavedAdapterLayer

__all__ = ["SAFETENSORS_NAME", "atomic_write_text", "read_safetensors", "write_safetensors",
           "LoadReport", "load_adapter_weights", "collect_adapter_state", "copy_checked", "trained_bias_params",
           "collect_prompt_learning_state", "load_prompt_learning_weights",
           "SavedAdapterLayer"]
