"""How close `peftkit train --dry-run`'s memory estimate comes to a measured training step.

For each shape, a forked child builds a Llama with LoRA on every linear layer and AdamW, takes a
warm-up step on a tiny batch (so the optimizer state and the kernels exist), then one step on a
batch of `batch x seq` tokens; the growth of its peak resident set over that step is the
measured memory of the step (activations, loss, gradients, temporaries). The estimate of the
same parts is `peftkit.recipe.memory.estimate_training_memory` minus what it counts that
already existed before the step (weights, AdamW moments). Weights and optimizer state are exact
counts of the parameters and need no measurement.

    python benchmarks/memory_estimate.py            # a table
    python benchmarks/memory_estimate.py --json     # the results as one JSON line (the test reads it)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys

import torch

# (hidden, intermediate, layers, heads, vocab, batch, seq, gradient checkpointing, attention)
SHAPES = [
    (128, 256, 2, 4, 1000, 8, 512, False, "sdpa"),
    (128, 256, 2, 4, 1000, 8, 512, True, "sdpa"),
    (256, 1024, 2, 4, 8000, 4, 512, False, "sdpa"),
    (128, 256, 2, 4, 1000, 4, 512, False, "eager"),
]
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(shape: tuple) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import LoraConfig, get_peft_model
    from peftkit.recipe.memory import ADAM_BYTES_PER_TRAINABLE, estimate_training_memory
    from peftkit.train.runtime import enable_gradient_checkpointing

    hidden, inter, layers, heads, vocab, batch, seq, checkpointing, attention = shape
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=4096, attn_implementation=attention, use_cache=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step(b: int, t: int) -> None:
        ids = torch.randint(0, vocab, (b, t))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1, 8)
    gc.collect()
    before = _rss()
    step(batch, seq)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    estimate = estimate_training_memory(model, "causal-lm", batch, seq, gradient_checkpointing=checkpointing)
    moments = sum(p.numel() for p in trainable) * (ADAM_BYTES_PER_TRAINABLE - 4)  # existed before the step
    estimated_step = estimate.peak() - estimate.weights - moments
    return {"shape": dict(hidden=hidden, intermediate=inter, layers=layers, heads=heads, vocab=vocab, batch=batch,
                          seq=seq, gradient_checkpointing=checkpointing, attention=attention),
            "measured_mib": round((peak - before) / MIB, 1), "estimated_mib": round(estimated_step / MIB, 1)}


def in_child(shape: tuple) -> dict:
    """Measure in a forked child: each shape starts from the same resident set and its own peak."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = measure(shape)
        except BaseException as exc:  # report it to the parent rather than die silently
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    if "error" in result:
        raise RuntimeError(f"shape {shape}: {result['error']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("--shapes", help="comma-separated indices into SHAPES (default: all)")
    args = parser.parse_args()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    torch.set_num_threads(1)
    # Import everything before the first fork: the children then share it, and a child's growth
    # is its step alone.
    import transformers  # noqa: F401

    import peftkit.recipe.memory  # noqa: F401
    import peftkit.train.runtime  # noqa: F401

    results = [in_child(shape) for shape in shapes]
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{'shape':<62} {'measured':>10} {'estimated':>10} {'ratio':>6}")
    for r in results:
        s = r["shape"]
        name = (f"h{s['hidden']} i{s['intermediate']} L{s['layers']} V{s['vocab']} {s['batch']}x{s['seq']} "
                f"{s['attention']}{' +checkpointing' if s['gradient_checkpointing'] else ''}")
        print(f"{name:<62} {r['measured_mib']:>7.1f} MiB {r['estimated_mib']:>7.1f} MiB "
              f"{r['estimated_mib'] / r['measured_mib']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
