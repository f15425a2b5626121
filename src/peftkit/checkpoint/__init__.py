"""The on-disk contract: PEFT key names, safetensors I/O, merged-model export."""
from .io import SAFETENSORS_NAME, atomic_write_text, read_safetensors, write_safetensors
from .keys import LoadReport, load_adapter_weights, collect_adapter_state

__all__ = ["SAFETENSORS_NAME", "atomic_write_text", "read_safetensors", "write_safetensors",
           "LoadReport", "load_adapter_weights", "collect_adapter_state"]
