"""`peftkit train`: end to end per row format and task, overrides, unknown keys, bad rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_helpers import ROWS, causal_config, cls_config, read_metrics, write_config, write_jsonl
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.recipe import evaluate_adapter, load_run_config

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png", "summary.json",
             "run_config.yaml", "tokenizer.json", "tokenizer_config.json")


def _assert_run_folder(out: Path, steps: int) -> dict:
    for name in RUN_FILES:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in train_records)
    summary = json.loads((out / "summary.json").read_text())
    if summary["eval_before"]:  # recorded as step 0, so the loss curve starts before training
        assert read_metrics(out)[0] == {"step": 0, "epoch": 0.0, **summary["eval_before"]}
    return summary


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "alpaca", "messages"])
def test_causal_lm_run_per_row_format(tmp_path, llama_dir, fmt, capsys):
    config = causal_config(tmp_path, llama_dir, fmt)
    assert main(["train", config]) == 0
    out = tmp_path / "run"
    summary = _assert_run_folder(out, steps=3)
    assert summary["data_format"] == fmt
    assert summary["eval_before"]["eval_loss"] > 0 and summary["eval_after"]["eval_perplexity"] > 1
    # The adapter moved away from its no-op start (LoRA B starts at zero).
    tensors = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert len(lora_b) == 14 and all(float(t.abs().max()) > 0 for t in lora_b)  # 7 linear layers x 2 blocks
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["base_model_name_or_path"] == llama_dir
    printed = capsys.readouterr().out
    assert f"format {fmt}" in printed and "eval: loss" in printed and str(out) in printed


def test_run_config_yaml_reloads_to_the_same_run(tmp_path, llama_dir):
    config = causal_config(tmp_path, llama_dir, "messages")
    assert main(["train", config, "train.max_steps=1"]) == 0
    saved = load_run_config(str(tmp_path / "run" / "run_config.yaml"))
    original = load_run_config(config, ["train.max_steps=1"])
    assert saved.to_dict() == original.to_dict()


def test_sequence_classification_run(tmp_path, bert_dir, capsys):
    assert main(["train", cls_config(tmp_path, bert_dir, max_steps=6)]) == 0
    out = tmp_path / "run"
    summary = _assert_run_folder(out, steps=6)
    assert json.loads((out / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
    assert set(summary["eval_before"]) == {"eval_loss", "eval_accuracy"}
    printed = capsys.readouterr().out
    before, after = summary["eval_before"]["eval_accuracy"], summary["eval_after"]["eval_accuracy"]
    assert f"accuracy {100 * before:.1f}% -> {100 * after:.1f}%" in printed
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.classifier.weight"].shape == (2, 32)  # the head is saved (modules_to_save)


def test_seq2seq_run(tmp_path, t5_dir):
    data = write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"])
    config = write_config(tmp_path / "s2s.yaml", {
        "model": {"path": t5_dir, "task": "seq2seq"},
        "adapter": {"method": "lora", "r": 4, "target_modules": ["q", "v"]},
        "data": {"path": data, "eval_path": data, "max_length": 32},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 4, "lr": 1e-2,
                  "save_every": 0, "log_every": 1, "progress": False},
    })
    assert main(["train", config]) == 0
    summary = _assert_run_folder(tmp_path / "run", steps=3)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    # The adapter folder works with eval (same loss as the run's final eval) and generate.
    report = evaluate_adapter(str(tmp_path / "run"), data, batch_size=3)
    assert report.metrics["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-5)
    assert main(["generate", str(tmp_path / "run"), "What is the capital of France?", "--max-new-tokens", "3"]) == 0


def test_dotted_overrides_reach_every_section(tmp_path, llama_dir):
    config = causal_config(tmp_path, llama_dir, "text")
    out = tmp_path / "elsewhere"
    assert main(["train", config, "adapter.r=2", "lora.lora_alpha=6", "adapter.target_modules=[q_proj, v_proj]",
                 "train.max_steps=2", f"train.output_dir={out}", "data.max_length=16", "train.lr=5e-3"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (2, 6, ["q_proj", "v_proj"])
    resolved = load_run_config(str(out / "run_config.yaml"))
    assert resolved.data.max_length == 16 and resolved.train.lr == 5e-3 and resolved.train.max_steps == 2
    assert max(r["step"] for r in read_metrics(out)) == 2
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)


def test_unknown_keys_in_every_section_are_reported_together_with_suggestions(tmp_path, llama_dir, capsys):
    config = write_config(tmp_path / "bad.yaml", {
        "modle": {"path": llama_dir},
        "model": {"path": llama_dir, "dtyp": "fp32"},
        "adapter": {"method": "lora", "rr": 4, "lora_alpah": 8},
        "data": {"path": "x.jsonl", "max_len": 64},
        "train": {"learning_rate": 1e-4, "max_length": 64, "epochs": 0},
    })
    assert main(["train", config, "train.warmup_step=3"]) == 2
    err = capsys.readouterr().err
    expected = [
        "modle: unknown section; did you mean model?",
        "model.dtyp: unknown key; did you mean model.dtype?",
        "adapter.rr: unknown key; did you mean adapter.r?",
        "adapter.lora_alpah: unknown key; did you mean adapter.lora_alpha?",
        "data.max_len: unknown key; did you mean data.max_length?",
        "train.learning_rate: unknown key; did you mean train.lr?",
        "train.max_length: unknown key; 'max_length' is a data setting: did you mean data.max_length?",
        "train.warmup_step: unknown key; did you mean train.warmup_steps?",
        "train.epochs=0: expected an integer >= 1",
    ]
    for line in expected:
        assert line in err
    assert "(9 problems)" in err


def test_unknown_adapter_method_and_bad_values(tmp_path, llama_dir, capsys):
    config = causal_config(tmp_path, llama_dir)
    assert main(["train", config, "adapter.method=lorra", "model.task=ner", "data.overflow=cut"]) == 2
    err = capsys.readouterr().err
    assert "adapter.method: 'lorra' is not a known method (did you mean 'lora'?); accepted: ia3, loha" in err
    assert "model.task: 'ner' is not accepted; accepted: causal-lm, seq-cls, seq2seq, token-cls" in err
    assert "data.overflow: 'cut' is not a policy; accepted: truncate, drop, error" in err
    assert main(["train", config, "trainlr=3"]) == 2
    assert "override 'trainlr=3' is not of the form section.key=value" in capsys.readouterr().err


def test_other_methods_come_from_the_registry(tmp_path, llama_dir):
    config = causal_config(tmp_path, llama_dir, "text")
    assert main(["train", config, "adapter={method: ia3, target_modules: [k_proj, down_proj], "
                 "feedforward_modules: [down_proj]}", "train.max_steps=1"]) == 0
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "IA3" and adapter["feedforward_modules"] == ["down_proj"]


@pytest.mark.parametrize("adapter", [
    "{method: lora, r: 2, target_modules: [q_proj], use_dora: true}",
    "{method: loha, r: 2, alpha: 4, target_modules: [q_proj, v_proj]}",
    "{method: lokr, r: 2, alpha: 4, target_modules: [q_proj, v_proj]}",
    "{method: prompt_tuning, num_virtual_tokens: 4}",
    "{method: prefix_tuning, num_virtual_tokens: 4}",
])
def test_every_method_trains_from_yaml(tmp_path, llama_dir, adapter):
    config = causal_config(tmp_path, llama_dir, "text")
    assert main(["train", config, f"adapter={adapter}", "train.max_steps=2", "--no-eval-before"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    method = adapter.split("method: ")[1].split(",")[0]
    assert saved["peft_type"] == method.upper()
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_malformed_row_names_file_and_line(tmp_path, llama_dir, capsys):
    config = causal_config(tmp_path, llama_dir, "messages")
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in ROWS["messages"][:2]] + ['{"messages": [{"role": "user"}]}']
    write_jsonl(bad, lines)
    assert main(["train", config, f"data.path={bad}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err and "content" in err


def test_dry_run_numbers_match_the_data_pipeline_without_weights(tmp_path, llama_dir, capsys):
    import shutil

    from peftkit import LoraConfig, get_peft_model
    from peftkit.data import DataConfig, prepare_datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A copy of the model folder without its weights: a dry run must not need them.
    no_weights = tmp_path / "no-weights"
    shutil.copytree(llama_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    config = causal_config(tmp_path, str(no_weights), "alpaca", max_steps=None, epochs=3, micro_batch_size=3,
                           grad_accum=2)
    assert main(["train", config, "--dry-run", "data.max_length=40"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "run").exists()

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    data = prepare_datasets(DataConfig(path=str(tmp_path / "alpaca.jsonl"), eval_split=0.2, max_length=40),
                            tokenizer, "causal-lm")
    s = data.stats
    assert (f"train: {s.rows_read} rows read, {s.rows_dropped} dropped, {s.rows_truncated} truncated, "
            f"{s.examples} examples in {s.sequences} sequences, {s.total_tokens} tokens ({s.trained_tokens} trained)"
            ) in printed
    assert s.rows_read == 8 and s.rows_truncated > 0  # 2 of 10 rows held out; long Alpaca prompts cut at 40
    steps_per_epoch = math.ceil(s.sequences / 6)
    assert f"rows per step: 6 (micro_batch_size 3 x grad_accum 2 x 1 process)" in printed
    assert f"steps: {steps_per_epoch} per epoch, {3 * steps_per_epoch} in total (3 epochs)" in printed
    assert f"tokens per step: {s.total_tokens / s.sequences * 6:,.0f} on average (padding excluded), at most 240" \
        in printed
    real = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable, total = real.get_nb_trainable_parameters()
    assert f"trainable parameters: {trainable:,} of {total:,}" in printed
    assert "lora on 14 modules" in printed
    assert "# resolved config" in printed and "max_length: 40" in printed


def test_relative_data_paths_are_read_from_the_config_folder(tmp_path, llama_dir, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    write_jsonl(folder / "rows.jsonl", ROWS["text"])
    config = write_config(folder / "run.yaml", {
        "model": {"path": llama_dir}, "adapter": {"target_modules": ["q_proj"]},
        "data": {"path": "rows.jsonl", "max_length": 32},
        "train": {"output_dir": "out", "max_steps": 1, "save_every": 0, "progress": False},
    })
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert main(["train", config]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # output_dir: relative to the cwd
    assert load_run_config(config).data.path == str(folder / "rows.jsonl")


def test_examples_train_on_their_sample_data(tmp_path, llama_dir, bert_dir):
    examples = Path(__file__).resolve().parents[2] / "examples"
    runs = {"chat_sft.yaml": llama_dir, "instruction_tuning.yaml": llama_dir, "text_classification.yaml": bert_dir}
    for name, model in runs.items():
        out = tmp_path / name
        common = [f"model.path={model}", "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1",
                  f"train.output_dir={out}", "train.progress=false", "train.save_every=0", "train.eval_every=0"]
        if name == "instruction_tuning.yaml":
            common.append("data.max_length=128")  # the tiny Llama has 256 positions
        assert main(["train", str(examples / name), *common]) == 0, name
        assert (out / "adapter_model.safetensors").is_file()


def test_config_problems_are_found_before_the_model_is_touched(tmp_path, capsys):
    config = causal_config(tmp_path, str(tmp_path / "missing-model"), lr="fast")
    assert main(["train", config]) == 2
    assert "train.lr='fast': expected a number" in capsys.readouterr().err
    # A model folder that does not exist is a config problem too (issue 15), named before any loading.
    assert main(["train", config, "train.lr=1e-3"]) == 2
    assert f"model.path: folder '{tmp_path / 'missing-model'}' does not exist" in capsys.readouterr().err



def test_a_run_makes_one_accelerator_and_the_loop_writes_its_files(tmp_path, llama_dir, monkeypatch):
    import peftkit.recipe.run as run_module
    import peftkit.train.loop as loop_module

    made, recipe_writes = [], []
    real_make, real_write = run_module.make_accelerator, run_module.atomic_write_text
    monkeypatch.setattr(run_module, "make_accelerator", lambda config: made.append(config) or real_make(config))
    monkeypatch.setattr(loop_module, "make_accelerator", lambda config: pytest.fail("a second Accelerator"))
    monkeypatch.setattr(run_module, "atomic_write_text",
                        lambda path, text: recipe_writes.append(Path(path).name) or real_write(path, text))
    assert main(["train", causal_config(tmp_path, llama_dir, "text")]) == 0
    assert len(made) == 1 and recipe_writes == ["run_config.yaml"]  # metrics, summary, curve: the loop's
    summary = _assert_run_folder(tmp_path / "run", steps=3)
    assert summary["eval_before"] and summary["eval_after"] == summary["final_eval"]
