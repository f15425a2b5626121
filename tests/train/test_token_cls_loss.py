"""Token classification in the training loop: the loss, target counting, accumulation, eval accuracy."""

import pytest
import torch
import torch.nn.functional as F
from _tiny_train import VOCAB, max_diff, trainable
from transformers import BertConfig, BertForTokenClassification

from peftkit import LoraConfig, get_peft_model
from peftkit.train import (
    TrainConfig,
    count_targets,
    evaluate,
    make_collate,
    token_cls_loss,
    train,
)
from peftkit.train.runtime import make_accelerator, resolve_task

NUM_LABELS = 3


def tiny_bert_token_cls(seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=NUM_LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = get_peft_model(BertForTokenClassification(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="TOKEN_CLS"))
    with torch.no_grad():  # a non-zero B, so every trainable tensor gets a gradient on step one
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def token_rows(n: int, seed: int = 0) -> list[dict]:
    """Each token's class is its id modulo 3; the first and last positions (like [CLS] / [SEP])
    and a random share of the others are unlabelled, so rows differ in labelled tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=gen))
        ids = torch.randint(1, 16, (length,), generator=gen).tolist()  # few distinct ids: quick to learn
        keep = (torch.rand(length, generator=gen) > 0.3).tolist()
        labels = [i % NUM_LABELS if k and 0 < p < length - 1 else -100 for p, (i, k) in enumerate(zip(ids, keep))]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def config(tmp_path, **overrides) -> TrainConfig:
    values = {"output_dir": str(tmp_path), "progress": False, "save_every": 0, "log_every": 1, "seed": 0}
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_is_cross_entropy_summed_over_labelled_tokens_without_shift():
    model = tiny_bert_token_cls()
    batch = make_collate(0, "token-cls")(token_rows(4, seed=1))
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"][:, 0] == -100).all()
    with torch.no_grad():
        loss_sum, n = token_cls_loss(model, batch)

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = batch["labels"] != -100
    expected = F.cross_entropy(logits[labelled], batch["labels"][labelled], reduction="sum")
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, NUM_LABELS), batch["labels"][:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
    assert float(loss_sum) == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(loss_sum) - float(shifted)) > 1e-2  # a next-token shift would be caught
    assert int(n) == int(labelled.sum()) == count_targets(batch, "token-cls")
    first_labelled = {"labels": torch.tensor([[2, -100, 1], [0, 1, -100]])}  # no shift: position 0 counts
    assert count_targets(first_labelled, "token-cls") == 4


def test_grad_accum_normalises_by_labelled_tokens_of_the_whole_window(tmp_path):
    rows = token_rows(4, seed=5)
    targets = [sum(label != -100 for label in r["labels"]) for r in rows]
    assert targets[0] + targets[1] != targets[2] + targets[3]  # unequal micro-batches

    start = trainable(tiny_bert_token_cls())
    reference = tiny_bert_token_cls()
    collate = make_collate(0, "token-cls")
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}

    def summed(part):
        loss_sum, _ = token_cls_loss(reference, collate(part))
        return loss_sum

    (summed(rows) / sum(targets)).backward()
    expected = {n: start[n] - p.grad for n, p in params.items()}  # SGD(lr=1): minus the gradient
    reference.zero_grad()
    ((summed(rows[:2]) / sum(targets[:2]) + summed(rows[2:]) / sum(targets[2:])) / 2).backward()
    mean_of_means = {n: start[n] - p.grad for n, p in params.items()}
    assert max_diff(expected, mean_of_means) > 1e-4  # what the loop must not compute

    def one_step(micro, accum):
        model = tiny_bert_token_cls()
        sgd = lambda m, c: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        train(model, rows, None, config(tmp_path / f"{micro}x{accum}", task="token-cls", max_steps=1,
                                        micro_batch_size=micro, grad_accum=accum, shuffle=False, max_grad_norm=None),
              optimizer_fn=sgd)
        return trainable(model)

    for micro, accum in [(2, 2), (1, 4), (4, 1)]:
        assert max_diff(one_step(micro, accum), expected) < 1e-6, (micro, accum)


def test_training_raises_token_accuracy_and_eval_matches_plain_math(tmp_path):
    model = tiny_bert_token_cls()
    rows, held_out = token_rows(48, seed=1), token_rows(12, seed=2)
    collate = make_collate(0, "token-cls")
    before = evaluate(make_accelerator(config(tmp_path)), model, held_out, collate, "token-cls", 4)
    result = train(model, rows, held_out, config(tmp_path, epochs=6, lr=1e-2, micro_batch_size=8, log_every=6))
    assert result.summary["task"] == "token-cls"  # task "auto" found it from the model class
    after = result.eval_metrics
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.2 and after["eval_loss"] < before["eval_loss"]

    model.eval()
    batch = collate(held_out)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = batch["labels"] != -100
    expected_loss = F.cross_entropy(logits[labelled], batch["labels"][labelled])
    expected_acc = (logits.argmax(-1)[labelled] == batch["labels"][labelled]).float().mean()
    assert after["eval_loss"] == pytest.approx(float(expected_loss), abs=1e-5)
    assert after["eval_accuracy"] == pytest.approx(float(expected_acc))
    assert "eval_perplexity" not in after


def test_auto_task_from_the_class_or_the_peft_task_type():
    model = tiny_bert_token_cls()
    assert resolve_task("auto", model) == "token-cls"

    class Wrapper(torch.nn.Module):  # neither class name nor base model tells the task
        def __init__(self):
            super().__init__()
            self.peft_config = {"default": LoraConfig(task_type="TOKEN_CLS")}

    assert resolve_task("auto", Wrapper()) == "token-cls"
    with pytest.raises(ValueError, match="or 'token-cls'"):
        resolve_task("auto", torch.nn.Linear(2, 2))


def test_collate_refuses_token_rows_without_labels():
    collate = make_collate(0, "token-cls")
    with pytest.raises(ValueError, match=r"rows \[1\] have no labels; token classification needs one class id"):
        collate([{"input_ids": [1, 2], "labels": [-100, 1]}, {"input_ids": [3]}])
