"""`peftkit merge` writes a complete deployable folder (sharded weights with an index, config,
generation config, the tokenizer and chat template as trained) and never writes NaN / Inf."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from export_helpers import make_adapter

from peftkit import PeftModel
from peftkit.checkpoint.export import NonFiniteWeightsError, export_merged
from peftkit.cli import main

TRAINED_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama_dir):
    """A LoRA adapter saved with the tokenizer it was trained with (a chat template of its own)."""
    from transformers import AutoTokenizer

    folder = make_adapter(llama_dir, tmp_path_factory.mktemp("merge") / "adapter", r=4, lora_alpha=8,
                          target_modules="all-linear")
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = TRAINED_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_merged_folder_is_sharded_complete_and_loads_with_the_adapters_logits(adapter, llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--max-shard-size", "40KB"]) == 0
    printed = capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert f"{len(shards)} weight shards" in printed and "parity OK" in printed
    assert not (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # staging folder renamed away

    assert GenerationConfig.from_pretrained(out).eos_token_id == AutoTokenizer.from_pretrained(llama_dir).eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == TRAINED_TEMPLATE  # the adapter's tokenizer, not the base's
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    batch = dict(tokenizer("Hello there, how are you today?", return_tensors="pt"))
    with torch.no_grad():
        want, got, plain = (m(**batch).logits for m in (adapted, merged, base))
    assert torch.allclose(got, want, atol=1e-5)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the logits, so the check can fail


def test_merge_replaces_an_earlier_export_but_not_a_folder_of_other_files(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(out), "--max-shard-size", "40KB"]) == 0
    assert main(["merge", str(adapter), "--out", str(out)]) == 0  # one file now: no stale shards left
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["merge", str(adapter), "--out", str(other)]) == 1
    assert "holds files but no model" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m"), "--max-shard-size", "lots"]) == 1
    assert "max_shard_size='lots' is not a size" in capsys.readouterr().err


def test_merge_refuses_to_write_nan_adapter_weights(adapter, llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    state = load_file(str(broken / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert main(["merge", str(broken), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "layers.1.self_attn.v_proj.lora_B" in err and "NaN" in err and "parity OK" not in err
    assert not (tmp_path / "m").exists()


def test_export_merged_names_the_non_finite_tensor(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    def peft_model():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                               LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
        return model

    model = peft_model()
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.o_proj.lora_A["default"].weight[1, 3] = float("inf")
    ids = {"input_ids": torch.tensor([[1, 2, 3]])}
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.0\.self_attn\.o_proj\.lora_A\.weight .*0 NaN, 1 Inf"):
        export_merged(model, str(tmp_path / "a"), [ids])
    assert not (tmp_path / "a").exists()

    # finite adapter, but the merged weight overflows float16
    model = peft_model()
    with torch.no_grad():
        model.get_base_model().model.layers[1].self_attn.o_proj.lora_B["default"].weight.fill_(1e5)
    with pytest.raises(NonFiniteWeightsError, match=r"merged weight model\.layers\.1\.self_attn\.o_proj\.weight .*"
                                                     r"after the cast to float16"):
        export_merged(model, str(tmp_path / "b"), [ids], dtype=torch.float16)
    assert not (tmp_path / "b").exists()
