"""What a mixed-adapter batch (`adapter_names=`) costs against a batch with one adapter.

Builds a Llama-style model from a config (no download) with two LoRA adapters on every linear
layer of the decoder, and times inference forwards (`torch.no_grad`, eval mode) of one batch:

  one adapter        `model(**batch)` with adapter a1 active (peftkit's usual path)
  names: all a1      `adapter_names=["a1"] * B`: the mixed path with a single group
  names: a1/a2       rows alternating between a1 and a2 (two adapters, every row adapted)
  names: a1/a2/base  rows split over a1, a2 and "__base__" (about a third each)

and the same for `peft` (its active-adapter forward and its mixed batch) when it is installed.
The configurations are timed round-robin (a slow spell of a shared machine hits all of them);
the median wall s/forward and process CPU s/forward (less moved by other jobs on a shared
machine; one thread by default) per configuration and their ratios to the same side's
one-adapter forward are printed and, with --json, written.

    python benchmarks/mixed_batch.py                      # hidden 512, 4 layers, batch 8 x 128
    python benchmarks/mixed_batch.py --hidden 64 --layers 1 --seq 8 --batch 3 --repeats 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def build(args, side: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                         vocab_size=args.vocab, max_position_embeddings=max(64, args.seq))
    base = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if side == "peft":
        import peft as lib
    else:
        import peftkit as lib
    model = lib.get_peft_model(base, lib.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets),
                               adapter_name="a1")
    model.add_adapter("a2", lib.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.set_adapter("a1")
    return model.eval()


def configurations(batch_size: int) -> dict[str, list[str] | None]:
    two = [("a1", "a2")[i % 2] for i in range(batch_size)]
    three = [("a1", "a2", "__base__")[i % 3] for i in range(batch_size)]
    return {"one adapter": None, "names: all a1": ["a1"] * batch_size, "names: a1/a2": two, "names: a1/a2/base": three}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)}
    sides = ["peftkit"] + (["peft"] if not args.no_peft else [])
    models = {side: build(args, side) for side in sides}
    configs = configurations(args.batch)
    times: dict[tuple[str, str], list[float]] = {(s, c): [] for s in sides for c in configs}
    cpu: dict[tuple[str, str], list[float]] = {(s, c): [] for s in sides for c in configs}
    outputs = {}
    with torch.no_grad():
        for repeat in range(args.warmup + args.repeats):
            for side in sides:
                for config, names in configs.items():
                    kwargs = {} if names is None else {"adapter_names": names}
                    start, start_cpu = time.perf_counter(), time.process_time()
                    logits = models[side](**batch, **kwargs).logits
                    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                    if repeat >= args.warmup:
                        times[(side, config)].append(elapsed)
                        cpu[(side, config)].append(elapsed_cpu)
                    outputs[(side, config)] = logits
    rows = []
    for side in sides:
        single = statistics.median(times[(side, "one adapter")])
        single_cpu = statistics.median(cpu[(side, "one adapter")])
        for config in configs:
            median, median_cpu = statistics.median(times[(side, config)]), statistics.median(cpu[(side, config)])
            rows.append({"side": side, "config": config, "s_per_forward": median, "vs_one_adapter": median / single,
                         "cpu_s_per_forward": median_cpu, "cpu_vs_one_adapter": median_cpu / single_cpu,
                         "times": times[(side, config)], "cpu_times": cpu[(side, config)]})
    agree = {}
    if "peft" in sides:
        for config in configs:
            agree[config] = float((outputs[("peftkit", config)] - outputs[("peft", config)]).abs().max())
    return {"shape": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "seq", "batch", "rank", "threads")},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__},
            "rows": rows, "max_abs_diff_to_peft": agree}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-peft", action="store_true", help="time peftkit only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"shape {result['shape']}")
    print(f"{'side':8} {'configuration':20} {'s/forward':>10} {'vs one':>7} {'cpu s':>8} {'vs one':>7}")
    for row in result["rows"]:
        print(f"{row['side']:8} {row['config']:20} {row['s_per_forward']:10.4f} {row['vs_one_adapter']:7.2f} "
              f"{row['cpu_s_per_forward']:8.4f} {row['cpu_vs_one_adapter']:7.2f}")
    for config, diff in result["max_abs_diff_to_peft"].items():
        print(f"max |peftkit - peft| logits, {config}: {diff:.2e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
