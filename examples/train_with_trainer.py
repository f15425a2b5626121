"""Train a LoRA adapter with the Hugging Face Trainer, using peftkit's Trainer subclass.

    python examples/train_with_trainer.py [--max-steps 60] [--out out/trainer-adapter]

`peftkit.integrations.Trainer` is `transformers.Trainer` with one difference: checkpoints and
`save_model()` hold only the adapter (adapter_config.json + adapter_model.safetensors, the
`peft` format), and `resume_from_checkpoint` / `load_best_model_at_end` load it back. The tiny
Llama is built from a config and the data is synthetic, so this runs offline in seconds.
"""
import argparse

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments, default_data_collator

from peftkit import LoraConfig, get_peft_model
from peftkit.integrations import Trainer


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama standing in for a pretrained one. Its weights are drawn wider than the
    default (std 0.1, not 0.02), because with the frozen lm_head that small the logits could
    never become confident and the demo loss would stall."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(config)


def make_rows(n: int, seed: int) -> dict[str, list[list[int]]]:
    """n rows of 32 token ids counting up through ids 4..19 from a random start: a pattern
    the adapter learns within a few dozen steps. Labels are the inputs (the model shifts them)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 16, (n, 1), generator=g)
    ids = (4 + (start + torch.arange(32)) % 16).tolist()
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--out", default="out/trainer-adapter", help="where the trained adapter is saved")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    model = get_peft_model(build_model(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.print_trainable_parameters()
    args = TrainingArguments(
        output_dir=f"{cli.out}-checkpoints", max_steps=cli.max_steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=1e-2, warmup_steps=5, logging_steps=10,
        save_steps=max(cli.max_steps // 2, 1), report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(make_rows(48, seed=1)),
                      eval_dataset=datasets.Dataset.from_dict(make_rows(16, seed=2)),
                      data_collator=default_data_collator)

    start = trainer.evaluate()["eval_loss"]
    print(f"eval loss at start: {start:.6f}")
    trainer.train()
    end = trainer.evaluate()["eval_loss"]
    print(f"eval loss at end: {end:.6f}")
    trainer.save_model(cli.out)  # adapter only: adapter_config.json + adapter_model.safetensors
    print(f"adapter saved to {cli.out}")
    assert end < start - 0.5, f"the loss did not drop: {start:.4f} -> {end:.4f}"


if __name__ == "__main__":
    main()
