"""Broken and hostile adapter folders: refused by PeftModel.from_pretrained / load_adapter and by
every `peftkit` command that loads one, naming the file and the tensor or key; an adapter name
can never become a path outside the save folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _tiny_train import tiny_llama
from safetensors.torch import load_file, save_file

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.checkpoint.adapter_check import AdapterFileError
from peftkit.cli.main import main as peftkit_main

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _fresh_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        pad_token_id=0, max_position_embeddings=128))


@pytest.fixture
def adapter(tmp_path) -> Path:
    folder = tmp_path / "adapter"
    tiny_llama().save_pretrained(str(folder))
    return folder


def tamper(folder: Path, change) -> str:
    tensors = load_file(str(folder / WEIGHTS))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    change(tensors, key)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return key


def set_nan(tensors, key):
    tensors[key] = tensors[key].clone()
    tensors[key][0, :3] = float("nan")


def lora_layers(model) -> int:
    return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(adapter, value):
    def poison(tensors, key):
        tensors[key] = tensors[key].clone()
        tensors[key][0, :3] = value

    key = tamper(adapter, poison)
    numel = load_file(str(adapter / WEIGHTS))[key].numel()
    with pytest.raises(AdapterFileError, match=rf"holds NaN or Inf values: {key} \(3 of {numel} values\).*"
                                               r"check_finite=False \(CLI: --allow-nonfinite\)"):
        PeftModel.from_pretrained(_fresh_base(), str(adapter))
    # The explicit opt-out loads it, to look at.
    model = PeftModel.from_pretrained(_fresh_base(), str(adapter), check_finite=False)
    loaded = dict(model.named_parameters())[key.replace("lora_A.weight", "lora_A.default.weight")]
    assert int((~torch.isfinite(loaded)).sum()) == 3


@pytest.mark.parametrize("dtype,name", [(torch.int64, "I64"), (torch.bool, "BOOL")])
def test_integer_and_bool_tensors_are_refused(adapter, dtype, name):
    key = tamper(adapter, lambda t, k: t.__setitem__(k, t[k].to(dtype)))
    with pytest.raises(AdapterFileError, match=rf"adapter tensors must be floating point .*; found {key} \({name}\)"):
        PeftModel.from_pretrained(_fresh_base(), str(adapter))


def test_a_file_without_tensors_is_refused(adapter):
    save_file({}, str(adapter / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors holds no tensors: it is not a trained "
                                               r"adapter"):
        PeftModel.from_pretrained(_fresh_base(), str(adapter))


@pytest.mark.parametrize("edit,named", [
    (lambda c: c.update(r=10**9), "r=1000000000"),
    (lambda c: c.update(rank_pattern={"q_proj": 10**9}), "rank_pattern['q_proj']=1000000000"),
])
def test_a_config_too_big_for_its_weights_is_refused_before_allocating(adapter, edit, named):
    config = json.loads((adapter / CONFIG).read_text())
    edit(config)
    (adapter / CONFIG).write_text(json.dumps(config))
    base = _fresh_base()
    with pytest.raises(AdapterFileError, match=re.escape(named) + r" is larger than every dimension of the tensors "
                                               r"in .* \(largest: 128\), so it cannot describe them; refused before "
                                               r"allocating"):
        PeftModel.from_pretrained(base, str(adapter))
    assert lora_layers(base) == 0  # nothing was injected


def test_load_adapter_checks_the_same_and_leaves_the_model_as_it_was(adapter, tmp_path):
    model = PeftModel.from_pretrained(_fresh_base(), str(adapter))
    tamper(adapter, set_nan)
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        model.load_adapter(str(adapter), adapter_name="second")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../outside", "a/b", "a\\b", "..", ""])
def test_adapter_names_cannot_leave_the_save_folder(tmp_path, name):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"cannot be an adapter name: it becomes a sub-folder of the save folder"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
    # A name that got in by another road (peft's configs are plain dicts) is refused at save time.
    model.peft_config[name] = model.peft_config["default"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="cannot be an adapter name"):
        model.save_pretrained(str(out), selected_adapters=["default", name])
    assert not out.exists() and not Path("/tmp/elsewhere").exists() and not (tmp_path / "outside").exists()
    with pytest.raises(ValueError, match="cannot be an adapter name"):
        PeftModel.from_pretrained(_fresh_base(), str(tmp_path), adapter_name=name)


# ---- through the command line ---------------------------------------------------------------


@pytest.fixture
def cli_adapter(tmp_path) -> Path:
    """An adapter of a tiny Llama saved to disk, as `peftkit train` leaves it (tokenizer beside it)."""
    from cli_helpers import build_chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(0)
    base_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=64,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "one two three four five"}) + "\n")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit code, stdout and the error line (the last line of stderr: transformers' progress bars
    may come before it)."""
    code = peftkit_main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.replace("\r", "\n").strip().splitlines()
    return code, captured.out, lines[-1] if lines else ""


def test_eval_and_generate_refuse_a_nan_adapter_and_allow_it_on_request(cli_adapter, capsys):
    key = tamper(cli_adapter, set_nan)
    before = (cli_adapter / WEIGHTS).read_bytes()
    data = str(cli_adapter.parent / "data.jsonl")
    code, out, err = run_cli(capsys, "eval", str(cli_adapter), "--data", data)
    assert code == 1 and err.startswith("error: ") and f"holds NaN or Inf values: {key} (3 of " in err
    assert "Traceback" not in err
    code, out, err = run_cli(capsys, "generate", str(cli_adapter), "Hello", "--max-new-tokens", "2")
    assert code == 1 and f"{key} (3 of " in err and "--allow-nonfinite" in err
    code, out, err = run_cli(capsys, "eval", str(cli_adapter), "--data", data, "--allow-nonfinite")
    assert code == 0 and "nan" in out.lower(), err
    assert (cli_adapter / WEIGHTS).read_bytes() == before  # reading never writes


def test_merge_refuses_an_int_adapter(cli_adapter, capsys, tmp_path):
    tamper(cli_adapter, lambda t, k: t.__setitem__(k, t[k].to(torch.int64)))
    code, out, err = run_cli(capsys, "merge", str(cli_adapter), "--out", str(tmp_path / "merged"))
    assert code == 1 and "adapter tensors must be floating point" in err and "(I64)" in err
    assert not (tmp_path / "merged").exists()


def test_a_billion_laughs_run_config_beside_an_adapter_is_refused(cli_adapter, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (cli_adapter / "run_config.yaml").write_text("\n".join(lines) + "\n")
    assert (cli_adapter / "run_config.yaml").stat().st_size < 1024
    code, out, err = run_cli(capsys, "eval", str(cli_adapter), "--data", str(cli_adapter.parent / "data.jsonl"))
    assert code == 2 and "expands to more than 100000 values through anchors and aliases" in err


def test_hotswap_refuses_a_nan_adapter_and_keeps_the_loaded_one(adapter, tmp_path):
    from peftkit import hotswap_adapter

    model = PeftModel.from_pretrained(_fresh_base(), str(adapter))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(str(other))
    key = tamper(other, set_nan)
    with pytest.raises(AdapterFileError, match=rf"holds NaN or Inf values: {re.escape(key)} \(3 of "):
        hotswap_adapter(model, str(other), adapter_name="default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_resume_refuses_a_nan_checkpoint(adapter):
    from peftkit.integrations import load_adapters_in_place

    model = get_peft_model(_fresh_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = tamper(adapter, set_nan)
    with pytest.raises(AdapterFileError, match=rf"holds NaN or Inf values: {re.escape(key)} \(3 of "):
        load_adapters_in_place(model, str(adapter))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
