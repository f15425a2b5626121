"""Paired step times on the plain loop: peft, peftkit and the base alone, in one process.

`routes.py` runs every (route, side) in a fresh process, which is what its peak-memory figures
need. Its step times, though, drift on a shared machine: the same configuration measured minutes
apart moved by up to 30% here, more than the differences it compares. This script measures only
time, for the plain loop (`loss = model(**batch).loss; loss.backward(); opt.step()`): the peft
model, the peftkit model and `routes.py --floor`'s base alone (the frozen base with peftkit's
chunked loss and GEMM route, no adapter) are built in one process from the same base weights and
initial adapter, and each round runs one step of each back to back, the order rotating. The
ratio of each round's steps is taken and the median over the rounds is reported, so drift slower
than a round cancels. No memory figures: the sides share the process.

    python benchmarks/paired_steps.py --width a --rounds 12 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import below_one, loadavg, machine  # noqa: E402

SIDES = ("peft", "peftkit", "floor")


def measure(width: str, dtype: str, rounds: int, warmup: int, threads: int, seed: int = 0, lr: float = 1e-3) -> dict:
    import torch

    import routes

    routes._import_everything()
    torch.set_num_threads(threads)
    spec = dict(routes.WIDTHS[width], width=width, dtype=dtype, seed=seed, lr=lr, route="plain",
                warmup=warmup, steps=rounds, threads=threads)
    batches = routes.token_batches(spec)
    steps = {}
    with tempfile.TemporaryDirectory(prefix="paired-") as adapter_dir:
        routes.make_initial_adapter(spec, adapter_dir)
        for side in SIDES:
            model = routes._attach(dict(spec, side=side), routes.build_base(spec), adapter_dir)
            steps[side] = routes.base_alone_step(model) if side == "floor" else routes.plain_step(model, lr)
    times = {side: [] for side in SIDES}
    losses = {side: [] for side in SIDES}
    for i, ids in enumerate(batches):
        order = SIDES[i % 3:] + SIDES[:i % 3]
        for side in order:
            start = time.perf_counter()
            losses[side].append(steps[side](ids))
            times[side].append(time.perf_counter() - start)
    measured = {side: t[warmup:] for side, t in times.items()}
    out = {"width": width, "dtype": dtype, "rounds": rounds, "threads": threads,
           "s_per_step": {side: statistics.median(t) for side, t in measured.items()},
           "step_times": measured, "losses": losses}
    for side in ("peftkit", "floor"):
        pairs = [a / b for a, b in zip(measured[side], measured["peft"])]
        out[f"{side}_vs_peft"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs),
                                  "per_round": pairs}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", default="a", choices=["a", "b", "tiny"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=12, help="measured rounds (one step of each side per round)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result to this file")
    args = p.parse_args(argv)
    problems = below_one(args, ("rounds", "warmup", "threads"))
    if problems:
        p.error("; ".join(problems))
    info = machine(("torch", "transformers", "peft"))
    print(f"machine: {info}")
    r = measure(args.width, args.dtype, args.rounds, args.warmup, args.threads)
    print(f"width {args.width}, {args.dtype}, {args.rounds} rounds (+{args.warmup} warm-up), {args.threads} threads; "
          f"median s/step: " + ", ".join(f"{side} {r['s_per_step'][side]:.3f}" for side in SIDES))
    for side in ("peftkit", "floor"):
        q = r[f"{side}_vs_peft"]
        print(f"{'base alone' if side == 'floor' else side} / peft, per round: median {q['median']:.3f} "
              f"(min {q['min']:.3f}, max {q['max']:.3f})")
    print(f"load average at end {loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(r, machine=info), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
