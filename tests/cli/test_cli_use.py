"""Using a trained adapter folder: merge (with parity), generate, eval, and inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import ROWS, causal_config, cls_config, write_jsonl

from peftkit import PeftModel
from peftkit.cli import main
from peftkit.recipe import evaluate_adapter, generate, load_adapter
from peftkit.recipe.inference import render_prompt


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, llama_dir) -> Path:
    """A causal-LM adapter trained on chat rows (enough steps to move its outputs)."""
    root = tmp_path_factory.mktemp("chat-run")
    config = causal_config(root, llama_dir, "messages", max_steps=8, lr=3e-2)
    eval_rows = write_jsonl(root / "eval.jsonl", ROWS["messages"][:6])
    assert main(["train", config, f"data.cache_dir={root / 'cache'}", "data.eval_split=0",
                 f"data.eval_path={eval_rows}", "--no-eval-before"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, bert_dir) -> Path:
    root = tmp_path_factory.mktemp("cls-run")
    assert main(["train", cls_config(root, bert_dir), f"data.cache_dir={root / 'cache'}"]) == 0
    return root / "run"


def _batch(tokenizer, text: str) -> dict:
    return dict(tokenizer(text, return_tensors="pt"))


def test_merge_writes_a_plain_model_with_the_adapters_outputs(chat_run, llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(chat_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"merged model written to {out} (float32, with tokenizer)" in printed
    assert "parity OK: max |merged - adapter| output difference" in printed
    assert not (out / "adapter_config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(out)  # saved beside the weights
    batch = _batch(tokenizer, "Hello there, how are you today?")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(chat_run)).eval()
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        want, got, plain = (m(**batch).logits for m in (adapted, merged, base))
    assert torch.allclose(got, want, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the output, so the check can fail


def test_merge_of_a_classifier_keeps_labels_and_logits(cls_run, bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(cls_run), "--out", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, str(cls_run)).eval()
    batch = _batch(AutoTokenizer.from_pretrained(out), "great movie")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-5)


def test_merge_parity_failure_exits_non_zero(chat_run, tmp_path, capsys):
    # bf16 weights cannot match the fp32 adapter to 1e-7 of the largest logit.
    assert main(["merge", str(chat_run), "--out", str(tmp_path / "m"), "--dtype", "bf16", "--tolerance", "1e-7"]) == 1
    assert "PARITY FAILED" in capsys.readouterr().out


def test_merge_with_explicit_base_and_missing_adapter(chat_run, llama_dir, tmp_path, capsys):
    moved = tmp_path / "adapter"
    shutil.copytree(chat_run, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", str(moved), "--out", str(tmp_path / "m1")]) == 1
    assert "gone" in capsys.readouterr().err
    assert main(["merge", str(moved), "--out", str(tmp_path / "m2"), "--base", llama_dir]) == 0
    assert main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m3")]) == 1
    assert "No adapter_config.json" in capsys.readouterr().err


def test_generate_streams_greedy_text_with_the_chat_template(chat_run, llama_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["generate", str(chat_run), "Hello there", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    text = generate(str(chat_run), "Hello there", max_new_tokens=6, stream=False)
    assert streamed == text + "\n"  # TextStreamer ends the stream with a newline

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(chat_run)).eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_prompts_are_rendered_like_the_training_rows(chat_run, tmp_path):
    loaded = load_adapter(str(chat_run))
    text, special = render_prompt(loaded, "Hi")
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" and special is False
    alpaca_dir = tmp_path / "alpaca"
    shutil.copytree(chat_run, alpaca_dir)
    config = yaml.safe_load((alpaca_dir / "run_config.yaml").read_text())
    config["data"]["format"] = "alpaca"
    (alpaca_dir / "run_config.yaml").write_text(yaml.safe_dump(config))
    text, special = render_prompt(load_adapter(str(alpaca_dir)), "Name a color.")
    assert text.endswith("### Instruction:\nName a color.\n\n### Response:\n") and special is True


def test_generate_refuses_a_classifier(cls_run, capsys):
    assert main(["generate", str(cls_run), "hi"]) == 1
    assert "generate needs a causal-lm or seq2seq adapter" in capsys.readouterr().err


def test_eval_reproduces_the_runs_final_eval(chat_run, capsys):
    summary = json.loads((chat_run / "summary.json").read_text())
    config = yaml.safe_load((chat_run / "run_config.yaml").read_text())
    assert main(["eval", str(chat_run), "--data", config["data"]["eval_path"], "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    after = summary["eval_after"]
    assert f"(6 rows, causal-lm): loss {after['eval_loss']:.4f}, perplexity {after['eval_perplexity']:.2f}" in printed
    report = evaluate_adapter(str(chat_run), config["data"]["eval_path"], batch_size=1)
    assert report.metrics["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-5)


def test_eval_of_a_classifier_matches_training_and_remaps_labels(cls_run, tmp_path, capsys):
    summary = json.loads((cls_run / "summary.json").read_text())
    config = yaml.safe_load((cls_run / "run_config.yaml").read_text())
    assert main(["eval", str(cls_run), "--data", config["data"]["eval_path"]]) == 0
    assert f"accuracy {100 * summary['eval_after']['eval_accuracy']:.1f}%" in capsys.readouterr().out
    report = evaluate_adapter(str(cls_run), config["data"]["eval_path"])
    assert report.metrics["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-5)
    # A file with only "pos" rows: its own label list is ["pos"], which must map to class 1, not 0.
    only_pos = write_jsonl(tmp_path / "pos.jsonl", [{"text": "great great great", "label": "pos"}] * 3)
    loaded = load_adapter(str(cls_run))
    batch = loaded.tokenizer(["great great great"], return_tensors="pt")
    with torch.no_grad():
        predicted = int(loaded.model(**batch).logits.argmax(-1))
    accuracy = evaluate_adapter(str(cls_run), only_pos).metrics["eval_accuracy"]
    assert accuracy == (1.0 if predicted == 1 else 0.0)
    unknown = write_jsonl(tmp_path / "odd.jsonl", [{"text": "meh", "label": "neutral"}])
    assert main(["eval", str(cls_run), "--data", unknown]) == 1
    assert "labels ['neutral'] are not classes of the adapter; its classes: ['neg', 'pos']" in capsys.readouterr().err


def test_packed_eval_equals_unpacked_eval(chat_run, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS["messages"])
    packed = tmp_path / "packed"
    shutil.copytree(chat_run, packed)
    config = yaml.safe_load((packed / "run_config.yaml").read_text())
    config["data"]["packing"] = True
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    (packed / "run_config.yaml").write_text(yaml.safe_dump(config))
    plain = evaluate_adapter(str(chat_run), rows).metrics["eval_loss"]
    packed_loss = evaluate_adapter(str(packed), rows, batch_size=2).metrics["eval_loss"]
    assert packed_loss == pytest.approx(plain, rel=1e-5)


def test_inspect_lists_targetable_modules_and_matches(llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    assert main(["inspect", llama_dir]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM (model_type llama, task causal-lm)" in printed
    assert "q_proj" in printed and "x2" in printed and "64->64" in printed and "64->128" in printed
    assert "LoRA default targets for llama: q_proj, v_proj" in printed

    config = causal_config(tmp_path, llama_dir)
    assert main(["inspect", llama_dir, "--config", config, "adapter.target_modules=[q_proj, down_proj]"]) == 0
    printed = capsys.readouterr().out
    real = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    trainable, total = real.get_nb_trainable_parameters()
    assert f"matches 4 modules; adapter {trainable:,} trainable parameters vs base {total - trainable:,}" in printed
    assert "model.layers.1.mlp.down_proj" in printed and "<- matched 2" in printed

    assert main(["inspect", llama_dir, "--config", config, "adapter.target_modules=[qproj]"]) == 1
    printed = capsys.readouterr().out
    assert "target_modules=['qproj'] matched no module of the model" in printed and "q_proj" in printed


def test_console_script_and_python_dash_m(llama_dir):
    exe = Path(sys.executable).with_name("peftkit")
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in help_text and "merge" in help_text and "inspect" in help_text
    result = subprocess.run([sys.executable, "-m", "peftkit", "inspect", llama_dir], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout


def test_usage_errors_exit_with_2(tmp_path, capsys):
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert f"config file '{tmp_path / 'none.yaml'}' does not exist" in capsys.readouterr().err
    assert main(["merge", "x"]) == 2 and "--out" in capsys.readouterr().err
    assert main(["generate", "x", "hi", "--bogus"]) == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
