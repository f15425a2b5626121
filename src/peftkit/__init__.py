"""peftkit: parameter-efficient fine-tuning with PEFT-compatible adapters."""
from .config import PeftConfig, TaskType
from .methods.lora import LoraConfig
from .model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = ["PeftConfig", "TaskType", "LoraConfig", "PeftModel", "get_peft_model"]
