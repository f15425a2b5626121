"""Merged-model export: fold an adapter into its base, save a plain transformers folder, and
prove the folder computes what the adapter did (reload it and compare outputs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

# Default parity tolerance, relative to the largest reference output: fp32 only reorders sums;
# 16-bit weights round each merged weight (~3 significant digits) before the layers compound it.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


@dataclass
class MergeReport:
    """Outcome of `export_merged`: the largest |merged - adapter| output difference and the verdict."""

    out_dir: str
    max_abs_diff: float
    tolerance: float  # absolute, = relative tolerance * reference_scale
    reference_scale: float  # max(1, largest |output| of the adapter model)
    num_inputs: int
    dtype: str
    saved_tokenizer: bool

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def text(self) -> str:
        verdict = "parity OK" if self.ok else "PARITY FAILED"
        return (f"merged model written to {self.out_dir} ({self.dtype}"
                f"{', with tokenizer' if self.saved_tokenizer else ', no tokenizer'})\n"
                f"{verdict}: max |merged - adapter| output difference {self.max_abs_diff:.3g} over "
                f"{self.num_inputs} inputs (tolerance {self.tolerance:.3g})")


@torch.no_grad()
def export_merged(peft_model: Any, out_dir: str, inputs: list[dict[str, torch.Tensor]], *, tokenizer: Any = None,
                  dtype: torch.dtype | None = None, tolerance: float | None = None) -> MergeReport:
    """Merge the active adapter of `peft_model` (consumed), save to `out_dir`, reload, compare.

    inputs: model keyword arguments (e.g. input_ids [1, T]) run through both models.
    dtype: the saved weights' dtype (default: the model's). tolerance: relative to the largest
    reference output (default by dtype, see `_TOLERANCE`).
    """
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file; give a folder for the merged model")
    peft_model.eval()
    references = [_output(peft_model, batch) for batch in inputs]
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    saved_dtype = next(merged.parameters()).dtype
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    reloaded = type(merged).from_pretrained(out_dir, **_fp32()).eval()
    diff = max((float((_output(reloaded, b) - ref).abs().max()) for b, ref in zip(inputs, references)), default=0.0)
    scale = max([1.0] + [float(ref.abs().max()) for ref in references])
    relative = tolerance if tolerance is not None else _TOLERANCE.get(saved_dtype, 5e-2)
    return MergeReport(out_dir, diff, relative * scale, scale, len(inputs), str(saved_dtype).replace("torch.", ""),
                       tokenizer is not None)


def _output(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float().cpu()


def _fp32() -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}
