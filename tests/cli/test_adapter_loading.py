"""`load_adapter` says what it found: a broken saved tokenizer is an error, a base without one a warning."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from peftkit import LoraConfig, get_peft_model
from peftkit.recipe import load_adapter
from peftkit.recipe.loading import LoadError


@pytest.fixture
def adapter_dir(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                      base_model_name_or_path=llama_dir))
    model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_an_adapter_without_a_tokenizer_uses_the_base_models(adapter_dir, llama_dir):
    from transformers import AutoTokenizer

    loaded = load_adapter(str(adapter_dir))
    assert loaded.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(llama_dir).get_vocab()


def test_a_broken_saved_tokenizer_is_an_error_not_a_silent_fall_back(adapter_dir):
    (adapter_dir / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    with pytest.raises(LoadError, match=r"tokenizer saved in .*adapter \(tokenizer_config.json\) does not load: .*"
                                        r"remove them to use the base model's tokenizer"):
        load_adapter(str(adapter_dir))


def test_no_tokenizer_anywhere_warns_and_loads_without_one(adapter_dir, llama_dir, tmp_path):
    bare = tmp_path / "bare-base"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (Path(llama_dir) / name).exists():
            shutil.copy(Path(llama_dir) / name, bare / name)
    with pytest.warns(UserWarning, match=r"no tokenizer: .*adapter has none and the base model's \(.*bare-base\)"):
        loaded = load_adapter(str(adapter_dir), base=str(bare))
    assert loaded.tokenizer is None
