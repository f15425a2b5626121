"""Runs that would "complete" with a destroyed adapter: an infinite gradient norm stops the run
naming the step; a wild update or a rising loss is warned once, with its numbers."""
from __future__ import annotations

import warnings

import pytest
import torch
from _tiny_train import lm_rows, max_diff, tiny_llama, trainable
from cli_helpers import build_chat_tokenizer, causal_config

from peftkit.cli.main import main as peftkit_main
from peftkit.train import TrainConfig, train
from peftkit.train.state import NonFiniteGradError


def config(out, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), progress=False, log_every=1, seed=7, micro_batch_size=4, max_steps=5,
                  save_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def divergence_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "diverging" in str(w.message)]


def test_a_huge_learning_rate_is_warned_once_with_its_numbers(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_llama(), lm_rows(16), None, config(tmp_path, lr=1e6))
    found = divergence_warnings(caught)
    assert len(found) == 1, found  # once per run, not once per step
    assert found[0].startswith("step 1: the update moved the trainable weights by ")
    ratio = float(found[0].split(" by ")[1].split(" times")[0])
    assert ratio > 1e5 and "at lr 1e+06" in found[0]


def test_a_rising_loss_is_warned_once(tmp_path):
    from peftkit.train import causal_lm_loss

    calls = []

    def worsening(model, batch):  # from step 6 on, the loss is 3 times the true one
        calls.append(1)
        loss_sum, n = causal_lm_loss(model, batch)
        return loss_sum * (1 if len(calls) <= 5 else 3), n

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_llama(), lm_rows(16), None, config(tmp_path, lr=1e-3, max_steps=12), loss_fn=worsening)
    found = divergence_warnings(caught)
    # compared as means of 5 steps: the first 5 against steps 6-10, where the rise holds
    assert len(found) == 1 and found[0].startswith("step 10: the mean loss of the last 5 steps")
    assert "times that of the first 5" in found[0]


def test_a_healthy_run_is_not_warned(tmp_path):
    """Also when single steps' losses differ 4x (batches of one easy or hard row, here made so by
    scaling the loss of every other step): their means do not rise."""
    from peftkit.train import causal_lm_loss

    calls = []

    def noisy(model, batch):
        calls.append(1)
        loss_sum, n = causal_lm_loss(model, batch)
        return loss_sum * (0.4 if len(calls) % 2 else 1.6), n

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_llama(), lm_rows(16), None, config(tmp_path, lr=5e-3, micro_batch_size=1, max_steps=12),
              loss_fn=noisy)
    assert divergence_warnings(caught) == []


def test_an_infinite_gradient_norm_stops_before_the_update(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=1e36, target_modules="all-linear"))
    before = trainable(model)
    with pytest.raises(NonFiniteGradError, match=r"gradient norm is inf at optimizer step 1 \(loss [0-9.]+\); "
                                                 r"training stopped before applying that step, no checkpoint was "
                                                 r"saved before it"):
        train(model, lm_rows(16), None, config(tmp_path, lr=1e-3))
    assert max_diff(trainable(model), before) == 0


def test_lora_alpha_1e36_through_the_cli_fails_with_exit_1(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=128,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = causal_config(tmp_path, str(model_dir), save_every=1)
    code = peftkit_main(["train", path, "adapter.lora_alpha=1e36", "--no-eval-before"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: gradient norm is inf at optimizer step 1")
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint-*")) and not (run / ".peftkit-run.lock").exists()
