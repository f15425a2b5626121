"""`peftkit` end to end for token classification: train, dry run, preview, eval, merge, and the
adapter in peftkit and in `peft`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import peft
import pytest
import torch
from cli_helpers import write_config, write_jsonl

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli import main
from peftkit.recipe import evaluate_adapter

PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]
PLACES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna"]
VERBS = ["visited", "left", "loves", "saw"]
LABELS = ["LOC", "O", "PER"]  # sorted tag names: the head's classes 0, 1, 2


def toy_rows(n: int, seed: int) -> list[dict]:
    """Who-went-where sentences: names are PER, cities LOC, the rest O (learnable by a tiny model)."""
    rng = random.Random(seed)
    return [{"tokens": [rng.choice(PEOPLE), rng.choice(VERBS), rng.choice(PLACES), "yesterday"],
             "tags": ["PER", "O", "LOC", "O"]} for _ in range(n)]


def ner_config(root: Path, model_dir: str, **train) -> str:
    settings = {"output_dir": str(root / "run"), "max_steps": 30, "micro_batch_size": 4, "lr": 1e-2,
                "save_every": 0, "log_every": 5, "progress": False, "seed": 0}
    settings.update(train)
    return write_config(root / "ner.yaml", {
        "model": {"path": model_dir, "task": "token-cls"},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"path": write_jsonl(root / "train.jsonl", toy_rows(48, seed=0)),
                 "eval_path": write_jsonl(root / "eval.jsonl", toy_rows(12, seed=1)), "max_length": 32,
                 "cache_dir": str(root / "cache")},
        "train": settings,
    })


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("ner-run")
    config = ner_config(root, bert_dir)
    return root, config


def _trained(ner_run, capsys) -> Path:
    """The run folder, training it on first use (the printed summary is checked then)."""
    root, config = ner_run
    out = root / "run"
    if not (out / "adapter_model.safetensors").exists():
        assert main(["train", config]) == 0
        printed = capsys.readouterr().out
        assert "data: task token-cls, format token_classification" in printed
        assert f"labels (3): {LABELS}" in printed
        assert "eval: accuracy " in printed
    return out


def _base(bert_dir: str):
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(
        bert_dir, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})


def _words_batch(tokenizer, rows: list[dict]) -> dict:
    return dict(tokenizer([r["tokens"] for r in rows], is_split_into_words=True, padding=True, return_tensors="pt"))


def test_training_raises_token_accuracy_and_saves_labels(ner_run, capsys):
    out = _trained(ner_run, capsys)
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_accuracy"] >= 0.9 and after["eval_accuracy"] > before["eval_accuracy"] + 0.2
    assert after["eval_loss"] < before["eval_loss"]
    assert summary["task"] == "token-cls" and summary["data_format"] == "token_classification"
    assert summary["data"]["eval"]["trained_tokens"] == 12 * 4  # one tagged sub-word per word
    assert json.loads((out / "labels.json").read_text()) == {"labels": LABELS}
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS" and adapter["modules_to_save"] == ["classifier", "score"]


def test_adapter_loads_back_in_peftkit_and_in_peft_with_the_same_logits(ner_run, bert_dir, capsys):
    from transformers import AutoTokenizer

    out = _trained(ner_run, capsys)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = _words_batch(tokenizer, toy_rows(4, seed=7))
    ours = PeftModel.from_pretrained(_base(bert_dir), str(out)).eval()
    theirs = peft.PeftModel.from_pretrained(_base(bert_dir), str(out)).eval()
    with torch.no_grad():
        a, b = ours(**batch).logits, theirs(**batch).logits
    assert a.shape == (4, batch["input_ids"].shape[1], 3)
    assert (a - b).abs().max() <= 1e-5
    # Predictions on the first sub-word of each word are the tags (the data is learnable).
    first = [[i for i, w in enumerate(batch_words) if w is not None and (i == 0 or batch_words[i - 1] != w)]
             for batch_words in (tokenizer([r["tokens"] for r in toy_rows(4, seed=7)],
                                           is_split_into_words=True).word_ids(k) for k in range(4))]
    predicted = [[LABELS[int(a[k, i].argmax())] for i in positions] for k, positions in enumerate(first)]
    assert sum(p == ["PER", "O", "LOC", "O"] for p in predicted) >= 3


def test_eval_reproduces_the_run_and_maps_the_files_tags(ner_run, bert_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = _trained(ner_run, capsys)
    root, _ = ner_run
    summary = json.loads((out / "summary.json").read_text())
    same = evaluate_adapter(str(out), str(root / "eval.jsonl"))
    assert same.metrics["eval_accuracy"] == pytest.approx(summary["eval_after"]["eval_accuracy"])
    assert same.metrics["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], abs=1e-5)

    # A file with tags O and PER only: its own sorted tags (O=0, PER=1) differ from the head's.
    rows = [{"tokens": [p, "slept"], "tags": ["PER", "O"]} for p in PEOPLE] + [{"tokens": ["hello"], "tags": ["O"]}]
    path = write_jsonl(tmp_path / "people.jsonl", rows)
    report = evaluate_adapter(str(out), path, batch_size=3)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(_base(bert_dir), str(out)).eval()
    correct = total = 0
    for row in rows:
        enc = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        words = enc.word_ids()
        for i, w in enumerate(words):
            if w is not None and (i == 0 or words[i - 1] != w):
                correct += LABELS[int(logits[i].argmax())] == row["tags"][w]
                total += 1
    assert total == 13 and report.rows == 7
    assert report.metrics["eval_accuracy"] == pytest.approx(correct / total)
    assert main(["eval", str(out), "--data", path]) == 0
    assert f"(7 rows, token-cls): accuracy {100 * correct / total:.1f}%" in capsys.readouterr().out


def test_merge_writes_a_token_classifier_with_the_adapters_outputs(ner_run, bert_dir, tmp_path, capsys):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    out = _trained(ner_run, capsys)
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged_dir)]) == 0
    assert "parity OK" in capsys.readouterr().out
    merged = AutoModelForTokenClassification.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == "BertForTokenClassification"
    assert merged.config.id2label == dict(enumerate(LABELS))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = _words_batch(tokenizer, toy_rows(3, seed=9))
    adapted = PeftModel.from_pretrained(_base(bert_dir), str(out)).eval()
    with torch.no_grad():
        assert (merged(**batch).logits - adapted(**batch).logits).abs().max() <= 1e-4


def test_generate_refuses_a_token_classifier(ner_run, capsys):
    out = _trained(ner_run, capsys)
    assert main(["generate", str(out), "Hello"]) == 1
    assert f"generate needs a causal-lm or seq2seq adapter; {out} is a token-cls adapter" in capsys.readouterr().err


def test_dry_run_counts_without_weights(ner_run, bert_dir, capsys):
    from transformers import AutoModelForTokenClassification

    _, config = ner_run
    assert main(["train", config, "train.grad_accum=2", "train.max_steps=null", "train.epochs=3", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"labels (3): {LABELS}" in printed
    assert "train: 48 rows read, 0 dropped, 0 truncated, 48 examples in 48 sequences, 288 tokens (192 trained)" \
        in printed  # [CLS] + 4 one-piece words + [SEP] = 6 tokens a row, 4 tagged
    assert "rows per step: 8 (micro_batch_size 4 x grad_accum 2 x 1 process)" in printed
    assert f"steps: {math.ceil(48 / 8)} per epoch, {3 * math.ceil(48 / 8)} in total (3 epochs)" in printed
    real = get_peft_model(AutoModelForTokenClassification.from_pretrained(bert_dir, num_labels=3),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="TOKEN_CLS"))
    trainable, total = real.get_nb_trainable_parameters()
    assert trainable == 4 * (4 * 32 * 2) + (32 * 3 + 3)  # LoRA A and B on 4 modules + the full head copy
    assert f"trainable parameters: {trainable:,} of {total:,}" in printed and "lora on 4 modules" in printed


def test_preview_shows_words_with_tags_and_inspect_knows_the_task(ner_run, bert_dir, capsys):
    _, config = ner_run
    assert main(["preview", config, "-n", "1"]) == 0
    first = toy_rows(1, seed=0)[0]["tokens"]
    expected = f"[CLS] {first[0].lower()}/PER {first[1]}/O {first[2].lower()}/LOC yesterday/O [SEP]"
    assert expected in capsys.readouterr().out
    assert main(["inspect", bert_dir, "--task", "token-cls"]) == 0
    assert "BertForTokenClassification (model_type bert, task token-cls)" in capsys.readouterr().out


def test_config_problems_specific_to_token_cls(tmp_path, bert_dir, capsys):
    config = ner_config(tmp_path, bert_dir)
    assert main(["train", config, "adapter={method: prompt_tuning, num_virtual_tokens: 4}", "data.packing=true"]) == 2
    err = capsys.readouterr().err
    assert "adapter.task_type='TOKEN_CLS'" in err
    assert "data.packing: packing is only for causal-lm, not model.task 'token-cls'" in err
    assert main(["train", config, "model.task=seq-cls", "data.label_all_subwords=true"]) == 2
    assert "data.label_all_subwords: only for model.task token-cls, not 'seq-cls'" in capsys.readouterr().err


def test_example_config_trains_on_its_sample_data(tmp_path, bert_dir):
    example = Path(__file__).resolve().parents[2] / "examples" / "token_classification.yaml"
    out = tmp_path / "out"
    assert main(["train", str(example), f"model.path={bert_dir}", "train.max_steps=2", "train.micro_batch_size=2",
                 f"train.output_dir={out}", "train.progress=false", "--no-eval-before"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert labels == sorted(labels) and {"B-PER", "I-PER", "B-LOC", "B-ORG", "B-MISC", "O"} <= set(labels)
