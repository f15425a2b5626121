"""The training loop on tiny peftkit models: learning, loss normalisation, eval numbers, outputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from _tiny_train import cls_rows, lm_rows, max_diff, tiny_bert_cls, tiny_llama, trainable

from peftkit.train import TrainConfig, make_collate, train
from peftkit.train.logging import read_metrics


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path), progress=False, save_every=0, log_every=1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_causal_lm_loss_decreases_and_eval_matches_plain_math(tmp_path):
    model = tiny_llama()
    rows, held_out = lm_rows(24, seed=1), lm_rows(6, seed=2)
    result = train(model, rows, held_out, config(tmp_path, max_steps=24, lr=1e-2, micro_batch_size=4, eval_every=12))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # nats

    # Eval loss = sum of next-token CE over every target token / number of target tokens.
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in held_out:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert result.eval_metrics["eval_loss"] == pytest.approx(total / count, abs=1e-5)
    assert result.eval_metrics["eval_perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_seq_cls_learns_and_reports_accuracy(tmp_path):
    model = tiny_bert_cls()
    rows, held_out = cls_rows(48, seed=1), cls_rows(16, seed=2)
    result = train(model, rows, held_out, config(tmp_path, epochs=6, lr=5e-3, micro_batch_size=8, log_every=6))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]

    collate = make_collate(0, "seq-cls")
    model.eval()
    with torch.no_grad():
        batch = collate(held_out)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert result.eval_metrics["eval_loss"] == pytest.approx(float(F.cross_entropy(logits, batch["labels"])), abs=1e-5)
    expected_acc = float((logits.argmax(-1) == batch["labels"]).float().mean())
    assert result.eval_metrics["eval_accuracy"] == pytest.approx(expected_acc)
    assert "eval_perplexity" not in result.eval_metrics


def _one_step(tmp_path, rows, micro, accum, **overrides):
    model = tiny_llama()
    train(model, rows, None, config(tmp_path, max_steps=1, micro_batch_size=micro, grad_accum=accum,
                                    shuffle=False, **overrides))
    return trainable(model)


def test_grad_accum_normalises_by_tokens_of_the_whole_window(tmp_path):
    rows = lm_rows(4, seed=5)
    targets = [sum(label != -100 for label in r["labels"][1:]) for r in rows]
    assert len(set([targets[0] + targets[1], targets[2] + targets[3]])) == 2  # unequal micro-batches

    # With SGD(lr=1) the update is minus the gradient; compare to the plain math.
    sgd = dict(optimizer_fn=lambda m, c: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0))
    start = trainable(tiny_llama())
    reference = tiny_llama()
    collate = make_collate(0, "causal-lm")

    def summed(rows_):
        batch = collate(rows_)
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    (summed(rows) / sum(targets)).backward()
    expected = {n: start[n] - p.grad for n, p in params.items()}
    reference.zero_grad()
    # Mean of the two micro-batch means: what the loop must NOT compute.
    ((summed(rows[:2]) / sum(targets[:2]) + summed(rows[2:]) / sum(targets[2:])) / 2).backward()
    mean_of_means = {n: start[n] - p.grad for n, p in params.items()}
    assert max_diff(expected, mean_of_means) > 1e-3

    for micro, accum in [(2, 2), (4, 1), (1, 4)]:
        got = _train_sgd(tmp_path / f"sgd{micro}x{accum}", rows, micro, accum, sgd)
        assert max_diff(got, expected) < 1e-6, (micro, accum)

    # The same with the default AdamW, as the issue states it.
    adam_2x2 = _one_step(tmp_path / "a", rows, 2, 2)
    adam_4x1 = _one_step(tmp_path / "b", rows, 4, 1)
    assert max_diff(adam_2x2, adam_4x1) < 1e-6
    assert max_diff(adam_2x2, start) > 1e-4


def _train_sgd(out, rows, micro, accum, sgd):
    model = tiny_llama()
    train(model, rows, None, config(out, max_steps=1, micro_batch_size=micro, grad_accum=accum, shuffle=False,
                                    max_grad_norm=None), **sgd)
    return trainable(model)


def test_gradient_checkpointing_gives_the_same_step_and_is_switched_off_after(tmp_path):
    rows = lm_rows(8, seed=3)
    plain = _one_step(tmp_path / "plain", rows, 4, 2)

    def run(folder, checkpointing):
        model = tiny_llama()
        base = model.get_base_model()
        mlp, calls = base.model.layers[0].mlp, []
        original_forward = mlp.forward

        def counting_forward(*args, **kwargs):  # module hooks do not fire on recomputation; forward does
            calls.append(1)
            return original_forward(*args, **kwargs)

        mlp.forward = counting_forward
        train(model, rows, None, config(folder, max_steps=1, micro_batch_size=4, grad_accum=2,
                                        shuffle=False, gradient_checkpointing=checkpointing))
        return model, base, len(calls)

    _, _, calls_without = run(tmp_path / "without", False)
    model, base, calls_with = run(tmp_path / "ckpt", True)
    assert max_diff(plain, trainable(model)) < 1e-6
    assert calls_with == calls_without + 2  # each of the 2 micro-batches is recomputed in backward
    assert not base.is_activation_checkpointing and base.config.use_cache


def test_bf16_on_cpu_trains_and_fp16_on_cpu_is_refused(tmp_path):
    model = tiny_llama()
    before = trainable(model)
    result = train(model, lm_rows(8), None, config(tmp_path / "bf16", max_steps=2, precision="bf16"))
    assert result.summary["mixed_precision"] == "bf16" and result.train_loss > 0
    assert max_diff(trainable(model), before) > 0
    # The user's model is handed back without Accelerate's autocast wrapper: fp32 logits again.
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="precision='fp16' needs a CUDA GPU"):
            train(tiny_llama(), lm_rows(4), None, config(tmp_path / "fp16", max_steps=1, precision="fp16"))


def test_run_outputs_metrics_summary_plot_and_adapter(tmp_path):
    model = tiny_llama()
    result = train(model, lm_rows(16), lm_rows(4, seed=9),
                   config(tmp_path, max_steps=6, log_every=2, eval_every=3, micro_batch_size=4))
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6] and [r["step"] for r in eval_records] == [3, 6]
    for r in train_records:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert all("eval_perplexity" in r for r in eval_records)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["stopped_reason"] == "completed"
    assert summary["peak_memory_mb"] > 10 and summary["tokens"] > 0 and summary["train_time_s"] > 0
    assert summary["final_eval"]["eval_loss"] == result.eval_metrics["eval_loss"]
    assert summary["final_train_loss"] == train_records[-1]["loss"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "adapter_model.safetensors").exists()
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"


def test_tensorboard_writes_events_or_explains_the_missing_package(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            train(tiny_llama(), lm_rows(4), None, config(tmp_path, max_steps=1, tensorboard=True))
    else:
        train(tiny_llama(), lm_rows(4), None, config(tmp_path, max_steps=2, tensorboard=True))
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_early_stopping_after_patience_evals_without_improvement(tmp_path):
    # No row has a target: weights stay put, the eval loss is flat, so patience runs out.
    rows = [{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])} for r in lm_rows(8)]
    with pytest.warns(UserWarning, match="no target in the whole window"):
        result = train(tiny_llama(), rows, lm_rows(4, seed=3),
                       config(tmp_path, max_steps=20, eval_every=1, early_stopping_patience=2))
    assert result.stopped_reason == "early_stopping" and result.global_step == 3
    with pytest.raises(ValueError, match="early_stopping_patience=2 needs eval_data"):
        train(tiny_llama(), rows, None, config(tmp_path, max_steps=2, early_stopping_patience=2))


def test_a_datasets_dataset_trains_like_the_same_rows_in_a_list(tmp_path):
    from datasets import Dataset

    rows = [dict(r, text="ignored") for r in lm_rows(8, seed=4)]
    from_list, from_dataset = tiny_llama(), tiny_llama()
    train(from_list, rows, None, config(tmp_path / "list", max_steps=2, micro_batch_size=2, grad_accum=2))
    train(from_dataset, Dataset.from_list(rows), None,
          config(tmp_path / "ds", max_steps=2, micro_batch_size=2, grad_accum=2))
    assert max_diff(trainable(from_list), trainable(from_dataset)) == 0
    with pytest.raises(TypeError, match="train_data must be a datasets.Dataset or a sequence of dicts"):
        train(tiny_llama(), iter(rows), None, config(tmp_path / "it", max_steps=1))


def test_a_custom_loss_needs_a_count_fn_that_counts_the_same_targets(tmp_path):
    from peftkit.train import causal_lm_loss

    rows = lm_rows(4, seed=6)

    def loss_per_row(model, batch):  # a loss with its own notion of targets: one per row
        loss_sum, _ = causal_lm_loss(model, batch)
        return loss_sum, batch["labels"].shape[0]

    with pytest.raises(ValueError, match="loss_fn reported 4 targets for step 1, but count_fn counted"):
        train(tiny_llama(), rows, None, config(tmp_path / "a", max_steps=1, micro_batch_size=2, grad_accum=2),
              loss_fn=loss_per_row)
    result = train(tiny_llama(), rows, None, config(tmp_path / "b", max_steps=1, micro_batch_size=2, grad_accum=2),
                   loss_fn=loss_per_row, count_fn=lambda batch: batch["labels"].shape[0])
    assert result.global_step == 1 and result.train_loss > 0


def test_a_callers_eval_before_and_summary_keys_are_written_by_the_loop_alone(tmp_path):
    from peftkit.train.logging import RunLogger
    from peftkit.train.runtime import make_accelerator

    cfg = config(tmp_path, max_steps=2)
    accelerator = make_accelerator(cfg)
    before = {"eval_loss": 3.5, "eval_perplexity": float("inf")}
    seen = {}

    def extra(summary):
        seen.update(summary)
        return {"eval_before": before["eval_loss"], "mine": 1}

    result = train(tiny_llama(), lm_rows(8), None, cfg, accelerator=accelerator, eval_before=before,
                   summary_extra=extra)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 0, "epoch": 0.0, "eval_loss": 3.5, "eval_perplexity": None}  # JSON has no inf
    assert [r["step"] for r in records[1:]] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mine"] == 1 and summary["global_step"] == seen["global_step"] == 2
    assert result.summary == summary
    # A resumed session's own eval before replaces the earlier one as step 0.
    RunLogger(tmp_path, is_main=True, total_steps=2, start_step=2, progress=False, tensorboard=False,
              resume_step=2, eval_before={"eval_loss": 1.0})
    assert [(r["step"], r.get("eval_loss")) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(0, 1.0), (1, None), (2, None)]


def test_an_accelerator_for_another_precision_is_refused(tmp_path):
    from peftkit.train.runtime import make_accelerator

    accelerator = make_accelerator(config(tmp_path, precision="fp32"))
    with pytest.raises(ValueError, match="runs mixed_precision='no', but precision='bf16' asks for 'bf16'"):
        train(tiny_llama(), lm_rows(4), None, config(tmp_path, max_steps=1, precision="bf16"), accelerator=accelerator)
