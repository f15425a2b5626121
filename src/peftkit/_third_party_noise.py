"""Log lines other libraries print on every command although nothing is wrong, dropped one by
one by a filter on their own logger (their other messages are kept). Installed on `import peftkit`.

- DeepSpeed: "Setting accelerator to CPU ..." on every machine without a GPU; Accelerate imports
  deepspeed whenever it is installed, also when no DeepSpeed engine is used.
- torchao: "Failed to load .../torchao/_C....so" for the GPU / other-Python extensions its wheel
  ships; transformers imports torchao whenever it is installed (its quantizer registry).
- torch: "<enum ...> is an Enum subclass and is now natively supported by torch.compile", which
  torchao's import triggers through a deprecated pytree call.
- bitsandbytes: "MatMul8bitLt: inputs will be cast from ... to float16" on every call of every
  8-bit layer whose input is not fp16 (it casts, as documented: LLM.int8 computes in fp16).
"""
from __future__ import annotations

import logging

KNOWN_NOISE = {
    "DeepSpeed": lambda msg: msg.startswith("Setting accelerator to CPU"),
    "torchao": lambda msg: msg.startswith("Failed to load") and "torchao" in msg,
    "torch.utils._pytree": lambda msg: "is an Enum subclass and is now natively supported by torch.compile" in msg,
    "bitsandbytes.autograd._functions": lambda msg: msg.startswith("MatMul8bitLt: inputs will be cast"),
}


def _noise_filter(is_noise):
    def keep(record: logging.LogRecord) -> bool:
        try:
            return not is_noise(record.getMessage())
        except Exception:  # a record whose message cannot be formatted is not ours to judge
            return True

    keep._peftkit_noise = True  # type: ignore[attr-defined]
    return keep


def silence_known_noise() -> None:
    """Add the filters (once per logger)."""
    for name, is_noise in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, "_peftkit_noise", False) for f in logger.filters):
            logger.addFilter(_noise_filter(is_noise))
