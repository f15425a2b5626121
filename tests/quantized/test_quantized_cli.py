"""`model.quantization` in a run config: a QLoRA run through the CLI (train, resume-able state of
an 8-bit optimizer, dry-run sizes, inspect, eval and merge on the quantized base)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))

from cli_helpers import causal_config, read_metrics  # noqa: E402
from conftest import llama_dir, models_root  # noqa: E402,F401  (session fixtures)
from peftkit.cli.main import main  # noqa: E402

pytest.importorskip("bitsandbytes")


def quantized_config(tmp_path, llama_dir, quantization: dict, **train) -> str:
    path = causal_config(tmp_path, llama_dir, **train)
    config = yaml.safe_load(Path(path).read_text())
    config["model"]["quantization"] = quantization
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def qlora_run(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    config = quantized_config(tmp, llama_dir, {"bits": 4, "type": "nf4", "double_quant": True}, max_steps=4)
    assert main(["train", config, "--no-eval-before"]) == 0
    return tmp / "run"


def test_a_qlora_run_trains_and_saves_only_the_adapter(qlora_run):
    losses = [row["loss"] for row in read_metrics(qlora_run) if "loss" in row]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    saved = yaml.safe_load((qlora_run / "run_config.yaml").read_text())
    assert saved["model"]["quantization"]["bits"] == 4
    assert (qlora_run / "adapter_model.safetensors").stat().st_size < 200_000


def test_eval_and_merge_use_the_quantized_base_the_adapter_was_trained_on(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = next(Path(qlora_run).parent.glob("*.jsonl"))
    assert main(["eval", str(qlora_run), "--data", str(data)]) == 0
    assert "loss" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert main(["merge", str(qlora_run), "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "parity OK" in printed
    assert "base: the 14 quantized layers (bitsandbytes-4bit) the adapter was trained on, dequantized" in printed
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())


def test_merge_can_requantize_and_reports_what_the_rounding_costs(qlora_run, tmp_path, capsys):
    """`merge --requantize` writes a 4-bit folder; the reload equals the requantized model, and the
    report gives its difference to the adapter model, which must match a recomputation."""
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.recipe.loading import load_adapter
    from peftkit.recipe.merge import parity_inputs

    out = tmp_path / "requantized"
    assert main(["merge", str(qlora_run), "--out", str(out), "--requantize"]) == 0
    printed = capsys.readouterr().out
    assert "parity OK: max |reloaded - requantized| output difference 0 " in printed
    reported = float(printed.split("max |requantized - adapter| output difference ")[1].split()[0])
    loaded = load_adapter(str(qlora_run), None, dtype="fp32")
    inputs = parity_inputs(loaded)
    with torch.no_grad():
        adapter = [loaded.model(**batch).logits for batch in inputs]
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        requantized = [reloaded(**batch).logits for batch in inputs]
    expected = max(float((a - b).abs().max()) for a, b in zip(adapter, requantized))
    assert 0 < expected and reported == pytest.approx(expected, rel=1e-2)
    assert isinstance(loaded.model, peftkit.PeftModel)


def test_requantize_is_refused_where_it_does_not_apply(qlora_run, llama_dir, tmp_path, capsys):
    assert main(["merge", str(qlora_run), "--out", str(tmp_path / "a"), "--requantize", "--dtype", "bf16"]) != 0
    assert "--requantize writes the quantized layers in their own format; --dtype bf16" in capsys.readouterr().err


def test_dry_run_reports_the_quantized_base_size(llama_dir, tmp_path, capsys):
    config = quantized_config(tmp_path, llama_dir, {"bits": 4})
    assert main(["train", config, "--dry-run"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("base weights:"))
    assert "quantized (4-bit nf4, bitsandbytes) instead of" in line
    ratio = float(line.rsplit("(", 1)[1].rstrip("x)"))
    assert 0.3 < ratio < 0.9  # the linear layers shrink 8x; embeddings and head stay fp32


def test_inspect_marks_the_layers_that_load_quantized(llama_dir, tmp_path, capsys):
    config = quantized_config(tmp_path, llama_dir, {"bits": 8})
    assert main(["inspect", llama_dir, "--config", config]) == 0
    out = capsys.readouterr().out
    assert "quantization: 14 linear layers load 8-bit (bitsandbytes); base weights" in out
    q_proj = next(l for l in out.splitlines() if l.strip().startswith("q_proj"))
    assert "[quantized 2]" in q_proj
    lm_head = [l for l in out.splitlines() if l.strip().startswith("lm_head")]
    assert all("quantized" not in l for l in lm_head)


def test_bad_quantization_section_is_a_config_error(llama_dir, tmp_path, capsys):
    config = quantized_config(tmp_path, llama_dir, {"bits": 2, "backend": "awq"})
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "model.quantization.bits: 2 is not accepted" in err and "model.quantization.backend: 'awq'" in err


@pytest.mark.parametrize("optimizer", ["adamw_8bit"])  # paged_adamw_8bit: the same code on CPU
def test_an_8bit_optimizer_state_resumes_exactly(llama_dir, tmp_path, optimizer):
    """bitsandbytes' 8-bit AdamW on a 4-bit base: resumed from its step-2 checkpoint, a run ends
    with the adapter of the uninterrupted 4-step run, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    config = quantized_config(tmp_path, llama_dir, {"bits": 4}, max_steps=4, optimizer=optimizer, save_every=2,
                              keep_last=None)
    # r=64: A and B of the 64-wide layers have 4,096 elements, bitsandbytes' threshold for 8-bit moments
    assert main(["train", config, "--no-eval-before", "adapter.r=64"]) == 0
    whole = load_file(tmp_path / "run" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in saved.values())  # the 8-bit moments, as they are
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    os.remove(tmp_path / "run" / "adapter_model.safetensors")
    assert main(["train", config, "--no-eval-before", "adapter.r=64", "train.resume_from=latest"]) == 0
    resumed = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_requantize_needs_an_adapter_trained_on_a_quantized_base(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.recipe.merge import merge_adapter

    model = peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                                   peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="--requantize: the base of .* is not quantized"):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "out"), requantize=True)
    assert not (tmp_path / "out").exists()
