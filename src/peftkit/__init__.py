"""peftkit: parameter-efficient fine-tuning with PEFT-compatible adapters."""
from ._third_party_noise import silence_known_noise

silence_known_noise()  # before transformers / deepspeed / torchao can log their known lines
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM,
                   AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from .config import PeftConfig, TaskType
from .fast_attention import disable_fast_attention, enable_fast_attention, fast_attention_enabled
from .methods.ia3 import IA3Config
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoraConfig
from .methods.lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from .model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "PeftConfig", "TaskType", "LoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "PromptTuningConfig",
    "PromptTuningInit", "PrefixTuningConfig", "PeftModel", "get_peft_model", "enable_fast_attention",
    "disable_fast_attention", "fast_attention_enabled", "hotswap_adapter", "prepare_model_for_compiled_hotswap",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "AutoPeftModelForSeq2SeqLM",
    "QuantizationConfig", "load_quantized_model", "quantize_nf4", "prepare_model_for_kbit_training",
]
# Quantized bases (QLoRA) live in the recipe layer with the other loaders; imported on first use so
# that `import peftkit` does not pull in the data pipeline and the training loop.
_QUANTIZATION = ("QuantizationConfig", "load_quantized_model", "quantize_nf4", "prepare_model_for_kbit_training")


def __getattr__(name: str):
    if name in _QUANTIZATION:
        from .recipe import quantization

        return getattr(quantization, name)
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
# The training loop (it pulls in accelerate) is imported on its own:
#     from peftkit.train import TrainConfig, train
