"""Train a LoRA adapter in your own Accelerate loop.

    python examples/train_with_accelerate.py [--max-steps 60] [--out out/accelerate-adapter]
    accelerate launch examples/train_with_accelerate.py      # several GPUs: DDP, same code

Prepare the peftkit model like any other module; afterwards `unwrap_model(...).save_pretrained`
writes only the adapter (`peft` format). The tiny Llama is built from a config and the data is
synthetic, so this runs offline in seconds.
"""
import argparse
import itertools

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, get_peft_model


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama standing in for a pretrained one. Its weights are drawn wider than the
    default (std 0.1, not 0.02), because with the frozen lm_head that small the logits could
    never become confident and the demo loss would stall."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(config)


def make_rows(n: int, seed: int) -> torch.Tensor:
    """[n, 32] token ids counting up through ids 4..19 from a random start: a pattern the
    adapter learns within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 16, (n, 1), generator=g)
    return 4 + (start + torch.arange(32)) % 16


@torch.no_grad()
def eval_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) on `ids`, dropout off."""
    was_training = model.training
    model.eval()
    loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--out", default="out/accelerate-adapter", help="where the trained adapter is saved")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    accelerator = Accelerator()
    model = get_peft_model(build_model(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader(TensorDataset(make_rows(48, seed=1)), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    held_out = make_rows(16, seed=2).to(accelerator.device)

    start = eval_loss(model, held_out)
    accelerator.print(f"eval loss at start: {start:.6f}")
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs, reshuffled each time
    for step, (ids,) in enumerate(itertools.islice(batches, cli.max_steps), start=1):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            accelerator.print(f"step {step}: train loss {loss.item():.4f}")
    end = eval_loss(model, held_out)
    accelerator.print(f"eval loss at end: {end:.6f}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(cli.out)  # adapter files only
        print(f"adapter saved to {cli.out}")
    assert end < start - 0.5, f"the loss did not drop: {start:.4f} -> {end:.4f}"


if __name__ == "__main__":
    main()
