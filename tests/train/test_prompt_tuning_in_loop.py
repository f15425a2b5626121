"""Prompt tuning trains through peftkit's loop (its logits include the virtual tokens)."""
import torch
from _tiny_train import lm_rows
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.train import TrainConfig, train


def test_prompt_tuning_loss_decreases_in_the_loop(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0))
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    before = model.prompt_encoder["default"].embedding.weight.detach().clone()
    config = TrainConfig(output_dir=str(tmp_path), max_steps=12, lr=3e-2, micro_batch_size=4, save_every=0,
                         progress=False, log_every=1, warmup_steps=0, scheduler="constant")
    result = train(model, lm_rows(16), lm_rows(8, seed=1), config=config)
    losses = [json_line["loss"] for json_line in _metrics(tmp_path) if "loss" in json_line]
    assert losses[-1] < losses[0]
    assert not torch.equal(model.prompt_encoder["default"].embedding.weight, before)
    assert result.eval_metrics["eval_loss"] > 0


def _metrics(folder):
    import json

    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
