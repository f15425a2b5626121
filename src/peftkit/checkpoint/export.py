"""Merged-model export: fold an adapter into its base, save a complete transformers folder
(sharded weights, config, generation config, tokenizer and chat template), and prove the folder
computes what the adapter did (reload it and compare outputs)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ..atomic_files import exchange_paths

# Default parity tolerance, relative to the largest reference output: fp32 only reorders sums;
# 16-bit weights round each merged weight (~3 significant digits) before the layers compound it.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
# The largest weights file written before the model is split into shards with an index: the
# Hugging Face Hub's recommended file size (transformers 4 used it as its default too).
DEFAULT_MAX_SHARD_SIZE = "5GB"


class NonFiniteWeightsError(ValueError):
    """The merge would write NaN or Inf weights; the message names the tensor."""


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
    weight_files: tuple[str, ...] = ()  # the safetensors files written (several: sharded, with an index)
    base_note: str | None = None  # what the base weights were, when not the checkpoint's as they are
    # Requantized merges only: max |requantized - adapter| output difference, the rounding of the
    # merged weights back to 4/8 bits (reported, not checked; max_abs_diff then compares the
    # reloaded folder with the requantized model in memory).
    requantized_diff: float | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def text(self) -> str:
        verdict = "parity OK" if self.ok else "PARITY FAILED"
        shards = f", {len(self.weight_files)} weight shards" if len(self.weight_files) > 1 else ""
        head = (f"merged model written to {self.out_dir} ({self.dtype}"
                f"{', with tokenizer' if self.saved_tokenizer else ', no tokenizer'}{shards})\n"
                + (f"base: {self.base_note}\n" if self.base_note else ""))
        if self.requantized_diff is None:
            return head + (f"{verdict}: max |merged - adapter| output difference {self.max_abs_diff:.3g} over "
                           f"{self.num_inputs} inputs (tolerance {self.tolerance:.3g})")
        return head + (f"requantized: max |requantized - adapter| output difference {self.requantized_diff:.3g} "
                       f"({self.requantized_diff / self.reference_scale:.1%} of the largest output; the rounding of "
                       f"the merged weights, not checked)\n"
                       f"{verdict}: max |reloaded - requantized| output difference {self.max_abs_diff:.3g} over "
                       f"{self.num_inputs} inputs (tolerance {self.tolerance:.3g})")


def first_nonfinite(tensors: Any) -> str | None:
    """A description of the first tensor in `tensors` ((name, tensor) pairs) holding NaN or Inf:
    its name and how many NaN / +-Inf values it holds; None when all are finite."""
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        return f"{name} (shape {tuple(tensor.shape)}: {nan} NaN, {int((~finite).sum()) - nan} Inf)"
    return None


@torch.no_grad()
def export_merged(peft_model: Any, out_dir: str, inputs: list[dict[str, torch.Tensor]], *, tokenizer: Any = None,
                  dtype: torch.dtype | None = None, tolerance: float | None = None,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, requantize: bool = False) -> MergeReport:
    """Merge the active adapter of `peft_model` (consumed), save to `out_dir`, reload, compare.

    inputs: model keyword arguments (e.g. input_ids [1, T]) run through both models.
    dtype: the saved weights' dtype (default: the model's). tolerance: relative to the largest
    reference output (default by dtype, see `_TOLERANCE`). max_shard_size: weights above it are
    split into shards plus `model.safetensors.index.json` (bytes, or a string like "5GB").
    requantize: a quantized base's merged layers are quantized again in their format and saved
    so (`merge_and_unload(requantize=True)`); the reload is then compared with that model, and
    its difference to the adapter model reported (`MergeReport.requantized_diff`).
    Refuses (NonFiniteWeightsError, nothing written) when an adapter tensor or a merged weight is
    NaN / Inf. The folder appears whole or not at all: it is built beside `out_dir` and renamed.
    """
    _check_out_dir(out_dir)
    peft_model.eval()
    bad = first_nonfinite(peft_model.adapter_state_dict().items())
    if bad:
        raise NonFiniteWeightsError(f"the adapter holds non-finite values in {bad}; merging it would write NaN/Inf "
                                    f"weights, so nothing was written. Retrain or repair the adapter")
    references = [_output(peft_model, batch) for batch in inputs]
    merged = merged_model(peft_model, dtype, requantize=requantize)
    requantized_diff = None
    if requantize:
        adapter_outputs, references = references, [_output(merged, batch) for batch in inputs]
        requantized_diff = max((float((a - b).abs().max()) for a, b in zip(adapter_outputs, references)), default=0.0)
    saved_dtype = next(merged.parameters()).dtype
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    reloaded = type(merged).from_pretrained(out_dir, **_fp32()).eval()
    diff = max((float((_output(reloaded, b) - ref).abs().max()) for b, ref in zip(inputs, references)), default=0.0)
    scale = max([1.0] + [float(ref.abs().max()) for ref in references])
    relative = tolerance if tolerance is not None else _TOLERANCE.get(saved_dtype, 5e-2)
    files = tuple(sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors")))
    return MergeReport(out_dir, diff, relative * scale, scale, len(inputs), str(saved_dtype).replace("torch.", ""),
                       tokenizer is not None, files, requantized_diff=requantized_diff)


@torch.no_grad()
def merged_model(peft_model: Any, dtype: torch.dtype | None = None, requantize: bool = False) -> torch.nn.Module:
    """`peft_model.merge_and_unload(requantize=...)` (consumes it), cast to `dtype`, refused when
    any merged weight is NaN / Inf (e.g. a finite delta that overflows float16)."""
    merged = peft_model.merge_and_unload(requantize=True) if requantize else peft_model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    bad = first_nonfinite(merged.state_dict().items())
    if bad:
        cast = f" after the cast to {str(dtype).replace('torch.', '')}" if dtype is not None else ""
        raise NonFiniteWeightsError(f"the merged weight {bad} is not finite{cast}; nothing was written")
    return merged


def _check_out_dir(out_dir: str) -> None:
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file; give a folder for the merged model")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")):
        raise ValueError(f"--out {out_dir!r} is a folder that holds files but no model (no config.json); give a new "
                         f"or empty folder, or an earlier merged model's folder to replace it")


def _replace_dir(staging: str, out_dir: str) -> None:
    """Rename `staging` to `out_dir`; an earlier export there is swapped out in one atomic step
    where the system can (else by two renames), then removed."""
    if os.path.isdir(out_dir) and exchange_paths(staging, out_dir):
        shutil.rmtree(staging, ignore_errors=True)  # now the earlier export
        return
    old = None
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=os.path.dirname(os.path.abspath(out_dir)))
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _output(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float().cpu()


def _fp32() -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}
