"""The GGUF files run in llama.cpp itself (through llama-cpp-python) and give peftkit's logits:
base GGUF + adapter GGUF (`--lora`), and the merged GGUF. Skipped unless llama-cpp-python is
installed (it builds llama.cpp from source): `make test-llama-cpp` installs it and runs this.

The base GGUF is written by the same writer as `--to gguf-merged` (no download is possible)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import make_adapter

from peftkit.cli import main

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

TEXT = "Hello there, how are you today? The quick brown fox jumps over the lazy dog."
# Both sides run fp32 (llama.cpp with an f32 KV cache); they differ by summation order only (~5e-7
# measured). Dropping the q/k row permutation or the Llama 3 rope factors moves logits by ~1e-2.
TOLERANCE = 1e-4


def _llama(model_path, lora_path=None):
    return llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                           logits_all=True, n_ctx=128, n_batch=128, n_threads=2, verbose=False, seed=0,
                           type_k=0, type_v=0)  # f32 KV cache (GGML_TYPE_F32): no rounding of keys / values


def _llama_cpp_logits(model_path, ids, lora_path=None) -> np.ndarray:
    llm = _llama(model_path, lora_path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "llama3-rope"])
def base(request, tmp_path_factory, llama_dir):
    """(HF folder, its GGUF, kind): the conftest's Llama, and export_helpers.TINY_BASES."""
    from export_helpers import save_tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.recipe.export import model_to_gguf

    root = tmp_path_factory.mktemp(request.param)
    folder = llama_dir if request.param == "llama" else save_tiny(request.param, root / "hf")
    path = root / "base.gguf"
    model_to_gguf(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), str(path),
                  dtype="f32")
    return folder, path, request.param


def _peftkit_logits(llama_dir, adapter_dir, ids) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from peftkit import PeftModel

    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    batch = torch.tensor([ids])
    with torch.no_grad():
        plain = base(input_ids=batch).logits[0]
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=batch).logits[0]
    return adapted, plain


def _ids(llama_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)(TEXT)["input_ids"]


def test_llama_cpp_tokenizes_like_the_hf_tokenizer_and_runs_the_base(base):
    llama_dir, base_gguf, arch = base
    ids = _ids(llama_dir)
    assert _llama(base_gguf).tokenize(TEXT.encode()) == ids
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(llama_dir).eval()(input_ids=torch.tensor([ids])).logits[0]
    got = _llama_cpp_logits(base_gguf, ids)
    diff = float(np.abs(got - want.numpy()).max())
    print(f"\nllama.cpp {arch} base GGUF vs transformers: max |logit diff| {diff:.3g} (max |logit| "
          f"{float(want.abs().max()):.3g}, {len(ids)} tokens)")
    assert diff < TOLERANCE


@pytest.mark.parametrize("kind", ["all-linear", "embedding+lm_head+rslora+patterns"])
def test_adapter_gguf_in_llama_cpp_gives_peftkits_logits(kind, base, tmp_path):
    llama_dir, base_gguf, arch = base
    settings = ({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} if kind == "all-linear" else
                {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj", "k_proj", "down_proj", "lm_head"],
                 "use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"down_proj": 4}})
    adapter = make_adapter(llama_dir, tmp_path / "adapter", seed=5, **settings)
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(tmp_path / "adapter.gguf")]) == 0
    ids = _ids(llama_dir)
    want, plain = _peftkit_logits(llama_dir, adapter, ids)
    got = _llama_cpp_logits(base_gguf, ids, tmp_path / "adapter.gguf")
    diff = float(np.abs(got - want.numpy()).max())
    effect = float((want - plain).abs().max())
    print(f"\nllama.cpp {arch} base + LoRA GGUF ({kind}) vs peftkit: max |logit diff| {diff:.3g}; the adapter "
          f"moves the logits by up to {effect:.3g}")
    assert effect > 100 * TOLERANCE  # the adapter matters, so a dropped or mis-scaled pair would fail
    assert diff < TOLERANCE


def test_merged_gguf_in_llama_cpp_gives_peftkits_logits(base, tmp_path):
    llama_dir, _, arch = base
    adapter = make_adapter(llama_dir, tmp_path / "adapter", seed=7, r=4, lora_alpha=8, target_modules="all-linear")
    out = tmp_path / "merged.gguf"
    assert main(["export", str(adapter), "--to", "gguf-merged", "--out", str(out), "--dtype", "f32"]) == 0
    ids = _ids(llama_dir)
    want, _ = _peftkit_logits(llama_dir, adapter, ids)
    diff = float(np.abs(_llama_cpp_logits(out, ids) - want.numpy()).max())
    print(f"\nllama.cpp {arch} merged GGUF (f32) vs peftkit: max |logit diff| {diff:.3g}")
    assert diff < TOLERANCE
