"""peftkit models under transformers.Trainer: the adapter-only subclass and the stock Trainer."""
import os

import datasets
import pytest
import torch
import transformers
from transformers import TrainingArguments, default_data_collator

import peftkit
from peftkit.checkpoint import read_safetensors
from peftkit.integrations import CheckpointMismatchError, PeftTrainer, Trainer, load_adapters_in_place
from tiny_models import llama, perturb_trainable

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def rows(n: int, seed: int, low: int = 4) -> datasets.Dataset:
    """Rows of 16 tokens counting up through the 8 ids low..low+7 (learnable), plus a text
    column the model does not take, which Trainer must drop."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 8, (n, 1), generator=g)
    ids = low + (start + torch.arange(16)) % 8
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "text": ["t"] * n})


def lora_model(seed: int = 0, dropout: float = 0.0, **model_overrides):
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
    return peftkit.get_peft_model(llama(seed, **model_overrides), config)


def args(out, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
                  logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=7, save_strategy="steps")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_state_equal(actual: dict, expected: dict, atol: float = 0.0) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=key)


def test_checkpoints_hold_only_the_adapter_and_it_loads_in_peft(tmp_path):
    import peft

    model = lora_model()
    trainer = Trainer(model=model, args=args(tmp_path / "run", max_steps=12, save_steps=6),
                      train_dataset=rows(24, 0), data_collator=default_data_collator)
    assert trainer.label_names == ["labels"]
    trainer.train()

    losses = train_losses(trainer)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

    for step in (6, 12):
        files = set(os.listdir(tmp_path / "run" / f"checkpoint-{step}"))
        assert ADAPTER_FILES <= files
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
        assert not files & FULL_MODEL_FILES, files
    saved = read_safetensors(str(tmp_path / "run" / "checkpoint-12" / "adapter_model.safetensors"))
    assert_state_equal(saved, model.adapter_state_dict())
    assert saved.keys() == {k for k in saved if k.startswith("base_model.model.model.layers.")}
    # The optimizer holds only adapter tensors, so the whole checkpoint stays small.
    optimizer_state = torch.load(tmp_path / "run" / "checkpoint-12" / "optimizer.pt", weights_only=True)
    adapter_numel = sum(t.numel() for t in saved.values())
    assert sum(v.numel() for s in optimizer_state["state"].values() for v in s.values() if v.dim()) == 2 * adapter_numel

    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert ADAPTER_FILES <= set(os.listdir(final)) and not set(os.listdir(final)) & FULL_MODEL_FILES
    batch = {"input_ids": torch.tensor(rows(2, 5)["input_ids"])}
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        reference = peft.PeftModel.from_pretrained(llama(0), str(final)).eval()(**batch).logits
    assert (ours - llama(0)(**batch).logits).abs().max() > 1e-3  # training changed the outputs
    torch.testing.assert_close(reference, ours, rtol=0, atol=1e-5)


def prompt_tuning_model():
    from peftkit.methods.prompt_tuning import PromptTuningConfig

    return peftkit.get_peft_model(llama(0), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


@pytest.mark.parametrize("make_model", [lambda: lora_model(dropout=0.1), prompt_tuning_model], ids=["lora", "prompt"])
def test_resume_from_checkpoint_matches_a_straight_run(tmp_path, make_model):
    # 6 steps per epoch: resuming at step 4 skips batches of a shuffled epoch and crosses into
    # the next; LoRA dropout makes the result depend on the restored RNG state too.
    common = dict(max_steps=8, save_steps=4, dataloader_drop_last=True)
    straight = make_model()
    first = Trainer(model=straight, args=args(tmp_path / "a", **common), train_dataset=rows(24, 0),
                    data_collator=default_data_collator)
    first.train()

    resumed = make_model()
    perturb_trainable(resumed, seed=11, scale=0.5)  # the checkpoint, not the init, must decide the result
    trainer = Trainer(model=resumed, args=args(tmp_path / "b", **common), train_dataset=rows(24, 0),
                      data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))

    assert trainer.state.global_step == 8
    # The history up to step 4 comes from the checkpoint; steps 5..8 were run again.
    assert train_losses(trainer) == pytest.approx(train_losses(first), rel=0, abs=1e-6)
    assert_state_equal(resumed.adapter_state_dict(), straight.adapter_state_dict(), atol=1e-6)
    assert_state_equal(read_safetensors(str(tmp_path / "b" / "checkpoint-8" / "adapter_model.safetensors")),
                       read_safetensors(str(tmp_path / "a" / "checkpoint-8" / "adapter_model.safetensors")), atol=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    model = lora_model()
    # Training on ids 4..11 while evaluating on ids 40..47: eval loss falls, then rises.
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=12, save_steps=3, eval_strategy="steps",
                                             eval_steps=3, load_best_model_at_end=True,
                                             metric_for_best_model="eval_loss"),
                      train_dataset=rows(24, 0), eval_dataset=rows(8, 1, low=40), data_collator=default_data_collator)
    trainer.train()

    eval_losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    best_step = min(eval_losses, key=eval_losses.get)
    assert best_step != 12, eval_losses  # otherwise the test could not tell best from last
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    best = read_safetensors(str(tmp_path / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    last = read_safetensors(str(tmp_path / "checkpoint-12" / "adapter_model.safetensors"))
    assert_state_equal(model.adapter_state_dict(), best)
    assert max((best[k] - last[k]).abs().max() for k in best) > 1e-3
    assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_losses[best_step], abs=1e-5)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = lora_model(dropout=0.1)
        trainer = Trainer(model=model, args=args(tmp_path / str(checkpointing), max_steps=3, save_strategy="no",
                                                 gradient_checkpointing=checkpointing),
                          train_dataset=rows(12, 0), data_collator=default_data_collator)
        trainer.train()
        assert model.base_model.is_activation_checkpointing is checkpointing
        results.append((train_losses(trainer), model.adapter_state_dict()))
    assert results[1][0] == pytest.approx(results[0][0], rel=0, abs=1e-6)
    assert_state_equal(results[1][1], results[0][1], atol=1e-6)


def test_every_adapter_of_a_multi_adapter_model_is_saved_and_loaded_in_place(tmp_path):
    model = lora_model()
    model.add_adapter("second", peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("second")
    perturb_trainable(model, seed=1)
    model.set_adapter("default")
    perturb_trainable(model, seed=2)
    trainer = Trainer(model=model, args=args(tmp_path / "run"), data_collator=default_data_collator)
    trainer.save_model(str(tmp_path / "saved"))
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "saved" / "second"))
    expected = {name: {key: tensor.clone() for key, tensor in model.adapter_state_dict(name).items()}
                for name in ("default", "second")}
    tensor_ids = [id(p) for p in model.parameters()]

    for name in ("second", "default"):
        model.set_adapter(name)
        perturb_trainable(model, seed=3, scale=1.0)
    load_adapters_in_place(model, str(tmp_path / "saved"))
    for name in ("default", "second"):
        assert_state_equal(model.adapter_state_dict(name), expected[name])
    assert [id(p) for p in model.parameters()] == tensor_ids  # same objects: optimizer state stays valid


def test_tied_embeddings_model_saves_checkpoints(tmp_path):
    # The stock Trainer writes a peftkit model's full state dict with safetensors, which refuses
    # the shared lm_head/embedding tensor; the adapter-only checkpoint has no such tensor.
    model = lora_model(tie_word_embeddings=True)
    Trainer(model=model, args=args(tmp_path, max_steps=2, save_steps=2), train_dataset=rows(8, 0),
            data_collator=default_data_collator).train()
    assert_state_equal(read_safetensors(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors")),
                       model.adapter_state_dict())


def test_label_smoothing_scores_each_position_against_the_next_token(tmp_path):
    model = lora_model()
    trainer = Trainer(model=model, args=args(tmp_path, label_smoothing_factor=0.1), data_collator=default_data_collator)
    ids = torch.tensor(rows(2, 3)["input_ids"])
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids.clone()})

    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    targets = ids[:, 1:]
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    smooth = -log_probs.mean(-1).mean()
    torch.testing.assert_close(loss.detach(), 0.9 * nll + 0.1 * smooth, rtol=0, atol=1e-5)


def test_save_with_a_gathered_state_dict_writes_its_values(tmp_path):
    # Under DeepSpeed Trainer passes the gathered full state dict to _save.
    model = lora_model()
    perturb_trainable(model)
    trainer = Trainer(model=model, args=args(tmp_path / "run"), data_collator=default_data_collator)
    gathered = {name: tensor * 2 for name, tensor in model.state_dict().items()}
    trainer._save(str(tmp_path / "out"), state_dict=gathered)
    expected = {key: tensor * 2 for key, tensor in model.adapter_state_dict().items()}
    assert_state_equal(read_safetensors(str(tmp_path / "out" / "adapter_model.safetensors")), expected)
    assert peftkit.PeftConfig.from_pretrained(str(tmp_path / "out")).inference_mode is True


def test_loading_a_checkpoint_of_another_adapter_config_names_the_keys(tmp_path):
    other = peftkit.get_peft_model(llama(0), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(str(tmp_path / "q_only"))
    model = peftkit.get_peft_model(llama(0), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys.*layers\.0\.self_attn\.v_proj\.lora_A\.weight"):
        load_adapters_in_place(model, str(tmp_path / "q_only"))
    with pytest.raises(CheckpointMismatchError, match=r"adapter 'default': no .*adapter_model\.safetensors"):
        load_adapters_in_place(model, str(tmp_path / "empty"))


def test_rejects_a_model_without_adapters(tmp_path):
    assert PeftTrainer is Trainer
    with pytest.raises(TypeError, match=r"got LlamaForCausalLM; wrap the model with peftkit\.get_peft_model"):
        Trainer(model=llama(0), args=args(tmp_path))


def test_stock_trainer_trains_and_evaluates_a_peftkit_model(tmp_path):
    model = lora_model()
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "stock", max_steps=4, save_steps=2),
                                   train_dataset=rows(16, 0), eval_dataset=rows(8, 1),
                                   data_collator=default_data_collator)
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_loss"] < 4.3
    files = set(os.listdir(tmp_path / "stock" / "checkpoint-2"))
    assert "model.safetensors" in files and not files & ADAPTER_FILES  # the stock Trainer saves everything

    # Its full-size checkpoint still resumes in peftkit's Trainer (Trainer's own loading path).
    resumed = lora_model()
    perturb_trainable(resumed, seed=11, scale=0.5)
    Trainer(model=resumed, args=args(tmp_path / "ours", max_steps=4, save_steps=2), train_dataset=rows(16, 0),
            data_collator=default_data_collator).train(resume_from_checkpoint=str(tmp_path / "stock" / "checkpoint-2"))
    assert_state_equal(resumed.adapter_state_dict(), model.adapter_state_dict(), atol=1e-6)


def test_token_classification_trains_and_checkpoints_the_adapter_and_head(tmp_path):
    # TOKEN_CLS puts the classifier head in modules_to_save: the adapter-only checkpoint must
    # carry it, and the loss is the model's own per-token cross-entropy (labels -100 ignored).
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    base = BertForTokenClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=32, num_labels=3))
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                            task_type="TOKEN_CLS"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 7, (32, 12), generator=g)  # six token ids: a quick mapping to learn
    labels = (ids % 3).masked_fill(torch.rand(ids.shape, generator=g) < 0.2, -100)  # class = token id mod 3
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=30, save_steps=30, learning_rate=5e-2),
                      train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    losses = train_losses(trainer)
    assert losses[-1] < 0.5 * losses[0]
    saved = set(os.listdir(tmp_path / "checkpoint-30"))
    assert ADAPTER_FILES <= saved and not (saved & FULL_MODEL_FILES)
    keys = read_safetensors(str(tmp_path / "checkpoint-30" / "adapter_model.safetensors"))
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)
