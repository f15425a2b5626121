"""Fast paths for the hot ops of LoRA training, each with a plain reference implementation.

- `lora_linear`: base linear + LoRA branch as one autograd node (saves x once; the dropout
  mask, `dropout_mask`, is a counter-based SplitMix64 draw kept for backward at 2 bits per
  element, drawn and applied on CPU by C kernels that `_native` builds at first use).
- `linear_cross_entropy` / `causal_lm_loss`: lm_head + cross-entropy in row chunks, never
  materialising the full logits.
- `dora_weight_norm`: DoRA's row norm of W + s·B A without forming that matrix.
- `attention`: softmax(q kᵀ · scale + bias) v for training-length sequences as per-batch
  GEMMs with the probabilities kept (CPU with native bf16 GEMMs: ~0.5x SDPA's time up to 512
  keys; without them, 2.2x, so it is not taken there);
  `peftkit.enable_fast_attention(model)` (opt-in; peftkit's training loop turns it on) routes
  a transformers model's SDPA calls to it in train mode, bf16/fp16, on CPU.
- `compile_decoder_layers` (in `kernels.compile`): torch.compile on each decoder layer.

Large fp32 matmuls of the fast paths run on oneDNN on x86 CPUs with AVX-512 (`_gemm.linear_nt`:
~2.3x MKL's sgemm on AMD CPUs, where MKL uses its AVX2 code; without AVX-512, MKL is faster).

Each op has its own switch: `set_fast_path("attention", False)` (or
`with fast_paths(False, "attention"):`, or PEFTKIT_FAST_PATHS=-attention in the environment)
runs that op's reference; `set_fast_paths(False)` (`with fast_paths(False):`,
PEFTKIT_FAST_PATHS=0) every op's. PEFTKIT_NATIVE_KERNELS=0 keeps the fast paths but runs the
C kernels' torch form (bit-identical).
"""
from ._dispatch import OPS as FAST_PATHS, fast_paths, fast_paths_enabled, set_fast_path, set_fast_paths
from .compile import compile_decoder_layers, find_decoder_layers
from .cross_entropy import (
    auto_chunk_rows,
    causal_lm_loss,
    causal_lm_loss_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from .attention import attention, attention_reference, causal_bias
from .dora import dora_weight_norm, dora_weight_norm_reference, weight_row_sq_norm
from .dropout_mask import dropout_keep_mask
from .lora_linear import lora_linear, lora_linear_reference

__all__ = [
    "attention",
    "attention_reference",
    "auto_chunk_rows",
    "causal_bias",
    "causal_lm_loss",
    "causal_lm_loss_reference",
    "compile_decoder_layers",
    "dora_weight_norm",
    "dora_weight_norm_reference",
    "dropout_keep_mask",
    "FAST_PATHS",
    "fast_paths",
    "fast_paths_enabled",
    "find_decoder_layers",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_reference",
    "set_fast_path",
    "set_fast_paths",
    "weight_row_sq_norm",
]
