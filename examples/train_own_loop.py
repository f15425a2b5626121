"""Train a LoRA adapter with peftkit's own loop on a tiny Llama built from a config (offline, CPU, < 30 s).

    python examples/train_own_loop.py [output_dir]

The same script runs on several processes unchanged:

    torchrun --nproc_per_node 2 examples/train_own_loop.py
    accelerate launch --num_processes 2 examples/train_own_loop.py
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.train import TrainConfig, train


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Counting sequences: a prompt (labels -100, not learned) followed by the continuation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randint(1, 8), rng.randint(6, 16)
        ids = list(range(start, start + length))
        prompt = rng.randint(2, 4)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def main(output_dir: str = "out/train_own_loop") -> None:
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.print_trainable_parameters()

    config = TrainConfig(
        output_dir=output_dir,
        max_steps=20,
        micro_batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        scheduler="cosine",
        eval_every=10,
        save_every=10,
        keep_last=2,
        log_every=5,
    )
    result = train(model, synthetic_rows(48, seed=1), synthetic_rows(8, seed=2), config)
    print(f"stopped: {result.stopped_reason} after {result.global_step} steps; "
          f"train loss {result.train_loss:.3f}; eval {result.eval_metrics}")
    print(f"adapter, metrics.jsonl, summary.json and loss_curve.png are in {result.output_dir}")

    # The saved adapter loads back onto a fresh copy of the base model and gives the same logits.
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(result.output_dir)).eval()
    probe = torch.tensor([[3, 4, 5, 6]])
    model.eval()  # LoRA dropout off in both
    with torch.no_grad():
        same = torch.allclose(model(input_ids=probe).logits, reloaded(input_ids=probe).logits, atol=1e-5)
    print(f"reloaded adapter reproduces the trained model: {same}")


if __name__ == "__main__":
    # A model this small runs fastest on one thread; a real model wants the default.
    torch.set_num_threads(1)
    main(*sys.argv[1:2])
