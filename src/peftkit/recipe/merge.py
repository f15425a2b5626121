"""`peftkit merge`: an adapter folder -> a plain transformers model folder, parity-checked."""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint.export import DEFAULT_MAX_SHARD_SIZE, MergeReport, export_merged
from ..methods.quantized_base import quantized_layers
from .loading import LoadedAdapter, load_adapter

MERGE_DTYPES = ("auto", "fp32", "bf16", "fp16")
# Inputs the parity check runs through both models (short, so the check stays cheap).
PARITY_TEXTS = (
    "Hello! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Summarize the following in one sentence: adapters are small.",
)


def merge_adapter(adapter_dir: str, out_dir: str, *, base: str | None = None, dtype: str = "auto",
                  tolerance: float | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                  requantize: bool = False) -> MergeReport:
    """Merge the adapter into its base (`base`, else the adapter's base_model_name_or_path) and
    write `out_dir`: weights (sharded with an index above `max_shard_size`, e.g. "5GB"), config,
    generation config, and the tokenizer with its chat template as trained (the one saved beside
    the adapter, else the base's); the report says whether the reloaded folder matches.

    dtype: of the saved weights; auto keeps the base checkpoint's dtype. The merge itself runs
    in fp32 so that 16-bit bases round only once. NaN / Inf adapter or merged weights are refused.
    requantize: an adapter trained on a quantized base is merged into the dequantized layers and
    each is quantized again in its format (a 4/8-bit model folder); the report gives what that
    rounding costs against the adapter model.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not accepted; accepted: {', '.join(MERGE_DTYPES)}")
    if requantize and dtype != "auto":
        raise ValueError(f"--requantize writes the quantized layers in their own format; --dtype {dtype} applies to "
                         f"a plain merge (leave --dtype out)")
    shard_bytes = parse_size(max_shard_size)
    loaded = load_adapter(adapter_dir, base, dtype="fp32")
    quantized = quantized_layers(loaded.model.get_base_model())
    if requantize and not quantized:
        raise ValueError(f"--requantize: the base of {adapter_dir!r} is not quantized (its run_config.yaml has no "
                         f"model.quantization); a plain merge writes it as it is")
    target = None if requantize else _checkpoint_dtype(loaded.base_path) if dtype == "auto" else {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    report = export_merged(loaded.model, out_dir, parity_inputs(loaded), tokenizer=loaded.tokenizer, dtype=target,
                           tolerance=tolerance, max_shard_size=shard_bytes, requantize=requantize)
    if quantized:  # run_config.yaml's model.quantization: the base the adapter was trained on
        kinds = ", ".join(sorted(set(quantized.values())))
        layers = f"the {len(quantized)} quantized layers ({kinds})"
        if requantize:
            report.dtype = f"{kinds}, the rest {report.dtype}"
        report.base_note = (f"{layers} the adapter was trained on, merged and quantized again" if requantize else
                            f"{layers} the adapter was trained on, dequantized (the other layers as in the "
                            f"checkpoint); parity is against that model")
    return report


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """A file size (bytes, or a string such as "5GB", "500MB", "2GiB") in bytes; refused when
    it is not a positive size."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):]
        try:
            value = int(float(number) * _SIZE_UNITS[unit])
        except (ValueError, KeyError):
            value = -1
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} is not a size; accepted: a positive number of bytes or a number "
                         f"with a unit ({', '.join(u for u in _SIZE_UNITS if u)}), e.g. 5GB or 500MB")
    return value


def parity_inputs(loaded: LoadedAdapter) -> list[dict[str, torch.Tensor]]:
    """A few real texts through the tokenizer, else seeded random token ids; one input each."""
    config = loaded.model.get_base_model().config
    if loaded.tokenizer is not None:
        batches = [dict(loaded.tokenizer(text, return_tensors="pt")) for text in PARITY_TEXTS]
    else:
        gen = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, 12), generator=gen)} for _ in PARITY_TEXTS]
    if getattr(config, "is_encoder_decoder", False):
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else 0
        for batch in batches:
            batch["decoder_input_ids"] = torch.cat(
                [torch.tensor([[start]]), batch["input_ids"][:, :5]], dim=1)
    return batches


def _checkpoint_dtype(base_path: str) -> torch.dtype:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    value: Any = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32
