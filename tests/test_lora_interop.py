"""An adapter saved by peftkit loads in `peft` with the same logits, and the other way round."""
import os

import peft
import pytest

import peftkit
from tiny_models import FACTORIES, inputs_for, logits, perturb_trainable, twin

CASES = {
    "llama-plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-rslora-all-linear": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama-regex": ("llama", dict(r=2, lora_alpha=4, target_modules=r".*\.(k|o)_proj")),
    "llama-layers": ("llama", dict(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1])),
    "llama-patterns": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                     alpha_pattern={"q_proj": 32})),
    "llama-modules-to-save": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True, use_dora=True)),
    "bert-seq-cls": ("bert", dict(r=4, lora_alpha=8, task_type="SEQ_CLS")),
    "t5-seq2seq": ("t5", dict(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM")),
}


def _save_dir(tmp_path, adapter_name):
    return str(tmp_path) if adapter_name == "default" else os.path.join(str(tmp_path), adapter_name)


@pytest.mark.parametrize("adapter_name", ["default", "second"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft(case, adapter_name, tmp_path):
    kind, kwargs = CASES[case]
    base = FACTORIES[kind]()
    reference_base = twin(base)
    batch = inputs_for(kind)
    plain = logits(base, batch)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(**kwargs), adapter_name=adapter_name)
    perturb_trainable(model)
    ours = logits(model, batch)
    model.save_pretrained(str(tmp_path))

    loaded = peft.PeftModel.from_pretrained(reference_base, _save_dir(tmp_path, adapter_name), adapter_name=adapter_name)
    theirs = logits(loaded, batch)
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("adapter_name", ["default", "second"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_peftkit(case, adapter_name, tmp_path):
    kind, kwargs = CASES[case]
    base = FACTORIES[kind]()
    our_base = twin(base)
    batch = inputs_for(kind)
    plain = logits(base, batch)
    reference = peft.get_peft_model(base, peft.LoraConfig(**kwargs), adapter_name=adapter_name)
    perturb_trainable(reference)
    theirs = logits(reference, batch)
    reference.save_pretrained(str(tmp_path))

    loaded = peftkit.PeftModel.from_pretrained(our_base, _save_dir(tmp_path, adapter_name), adapter_name=adapter_name)
    ours = logits(loaded, batch)
    assert (theirs - plain).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5


def test_saved_files_follow_the_peft_layout(tmp_path):
    model = peftkit.get_peft_model(FACTORIES["llama"](), peftkit.LoraConfig(
        r=4, target_modules=["q_proj", "embed_tokens"], use_dora=False, task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path))
    from safetensors import safe_open
    import json

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert tuple(f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape) == (4, 32)
        assert tuple(f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").shape) == (32, 4)
        assert tuple(f.get_tensor("base_model.model.model.embed_tokens.lora_embedding_A").shape) == (4, 64)
    assert len(keys) == 2 * 2 + 2
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert list(config) == sorted(config)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["inference_mode"] is True
    assert sorted(config["target_modules"]) == ["embed_tokens", "q_proj"]
