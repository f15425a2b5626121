"""One training step of peftkit against the `peft` library, same model, data and settings.

Each configuration runs in a fresh Python process (same interpreter, thread count and
allocator), builds a Llama-style model from a config (no download), attaches the adapter, and
times `steps` training steps after `warmup` steps: forward, loss, backward, AdamW step,
zero_grad. Reported per configuration:

  s/step       median wall seconds of the measured steps
  cpu s        median process CPU seconds of the same steps (all threads): on a machine shared
               with other jobs this moves less than the wall time
  peak MB      CPU: the process's peak RSS (ru_maxrss); GPU: torch.cuda.max_memory_allocated
  model MB     the same measure right after the model (with adapter) is built, so the part the
               training step adds (activations, gradients, optimizer state) is peak - model
  loss         the loss of the last measured step

Sides:
  floor    the frozen base model, no adapter, gradients to the input embeddings only (every
           layer still runs backward), transformers' own `labels=` loss: the cost of the base
  peft     peft.get_peft_model + the model's own `labels=` loss (what a peft + Trainer user runs)
  peftkit  peftkit.get_peft_model + the loss peftkit's loop uses (fused lm_head + CE where it
           applies, else full logits): what a peftkit user gets by default, including the
           attention kernel PeftModel routes CPU bf16 training forwards to; --compile adds a
           run with torch.compile on each decoder layer, --sdpa-rows a run with the model's
           own SDPA attention ("peftkit/sdpa": what the attention kernel is worth)

dtypes: fp32 (everything fp32) and bf16 (base weights bf16, adapter weights fp32 on both sides:
peft's default autocast_adapter_dtype=True, peftkit's default).

    python benchmarks/train_step.py                       # the default shape, all configurations
    python benchmarks/train_step.py --layers 2 --vocab 4096 --seq 64 --steps 3   # a quick look
    python benchmarks/train_step.py --json out.json --compile
    python benchmarks/train_step.py --paired --variants lora lora+dropout0.1 --steps 10   # one process

`--device cuda` runs the same on a GPU (peak = max_memory_allocated); it was not run on the
machine these numbers come from (no GPU there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from bench_common import answer_one, below_one, child_env, run_fresh

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

VARIANTS = {
    "lora": dict(lora_dropout=0.0, use_dora=False),
    "lora+dropout0.1": dict(lora_dropout=0.1, use_dora=False),
    "dora": dict(lora_dropout=0.0, use_dora=True),
}
DTYPES = ("fp32", "bf16")

# Targets from the issue: (what, dtype, variant, limit).
TIME_TARGET = {"bf16": 0.6, "fp32": 0.85}
MEM_TARGET = {"bf16": 0.7, "fp32": 0.8}
DROPOUT_TARGET = 1.10  # lora+dropout0.1 time / lora time
DORA_TARGET = 1.20  # dora time / lora time


# --------------------------------------------------------------------------- child process
def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux


def _current_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB
    return _rss_now_mb()


def build(spec: dict) -> dict:
    """The model (with adapter), optimizer, loss and batches of one configuration."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"], vocab_size=spec["vocab"],
        max_position_embeddings=max(2048, spec["seq"]),
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()

    side = spec["side"]
    if side == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer, to the embeddings' output
    else:
        variant = VARIANTS[spec["variant"]]
        kwargs = dict(r=spec["r"], lora_alpha=spec["alpha"], target_modules="all-linear", task_type="CAUSAL_LM", **variant)
        torch.manual_seed(spec["seed"] + 1)
        if side == "peft":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        else:
            import peftkit

            model = peftkit.get_peft_model(model, peftkit.LoraConfig(**kwargs))
            if not spec.get("sdpa"):  # /sdpa rows: the model's own SDPA attention, as on the other sides
                peftkit.enable_fast_attention(model)  # as peftkit's loop does (TrainConfig.fast_attention)
            if spec["compile"]:
                from peftkit.kernels.compile import compile_decoder_layers

                compile_decoder_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    n_steps = spec["warmup"] + spec["steps"]
    return {
        "model": model,
        "device": device,
        "trainable": trainable,
        "optimizer": torch.optim.AdamW(trainable, lr=1e-4) if side != "floor" else None,
        "loss_fn": _loss_fn(side),
        "batches": [torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen) for _ in range(n_steps)],
    }


def timed_step(setup: dict, ids) -> tuple[float, float, float]:
    """One training step on the batch `ids`: (wall seconds, process CPU seconds, loss)."""
    import torch

    model, device, optimizer = setup["model"], setup["device"], setup["optimizer"]
    ids = ids.to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = setup["loss_fn"](model, batch)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, float(loss)


def _attention(model, side: str) -> str:
    """Which attention ran: "peftkit" (the kernel, where it applies) or the model's own."""
    if side == "peftkit":
        from peftkit import fast_attention_enabled

        if fast_attention_enabled(model):
            return "peftkit"
    return model.config._attn_implementation


def run_one(spec: dict) -> dict:
    """Build, warm up and time one configuration; returns the measurements."""
    import torch

    if spec.get("paired"):
        return run_paired(spec)
    setup = build(spec)
    device = setup["device"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    model_mb = _current_mb(device)
    model_peak_mb = _peak_mb(device)

    times, cpu_times, losses = [], [], []
    for ids in setup["batches"]:
        wall, cpu, loss = timed_step(setup, ids)
        times.append(wall)
        cpu_times.append(cpu)
        losses.append(loss)
    measured = times[spec["warmup"]:]
    fused = None
    if spec["side"] == "peftkit":
        ids = setup["batches"][-1].to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        fused = setup["model"].chunked_loss_blocker(batch) or "used"  # else: why the full logits were used
    return {
        "fused_loss": fused,
        "attention": _attention(setup["model"], spec["side"]),
        "s_per_step": statistics.median(measured),
        "step_times": measured,
        "cpu_s_per_step": statistics.median(cpu_times[spec["warmup"]:]),
        "warmup_times": times[: spec["warmup"]],
        "peak_mb": _peak_mb(device),
        "model_mb": model_mb,
        "model_peak_mb": model_peak_mb,
        "loss": losses[-1],
        "trainable_params": sum(p.numel() for p in setup["trainable"]),
        "threads": torch.get_num_threads(),
    }


def run_paired(spec: dict) -> dict:
    """peftkit with each of spec["paired"]'s variants, in this one process, stepping in turn on
    the same batches (the order flips every step): per-variant step times without the
    process-to-process differences of separate runs. No memory numbers (one shared process)."""
    setups = {v: build(dict(spec, side="peftkit", variant=v, compile=False)) for v in spec["paired"]}
    times = {v: ([], [], []) for v in setups}
    for i in range(spec["warmup"] + spec["steps"]):
        order = list(setups) if i % 2 == 0 else list(reversed(setups))
        for v in order:
            wall, cpu, loss = timed_step(setups[v], setups[v]["batches"][i])
            if i >= spec["warmup"]:
                for column, value in zip(times[v], (wall, cpu, loss)):
                    column.append(value)
    return {v: {"s_per_step": statistics.median(w), "cpu_s_per_step": statistics.median(c), "step_times": w,
                "loss": losses[-1]} for v, (w, c, losses) in times.items()}


def _loss_fn(side: str):
    if side in ("floor", "peft"):
        return lambda model, batch: model(**batch, use_cache=False).loss

    # The loop's default causal-LM loss: fused lm_head + CE where exact, full logits elsewhere.
    from peftkit.train.loss import fast_causal_lm_loss

    def peftkit_loss(model, batch):
        loss_sum, n = fast_causal_lm_loss(model, batch)
        return loss_sum / n

    return peftkit_loss


# --------------------------------------------------------------------------- parent process
def configurations(args) -> list[dict]:
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch",
                                            "r", "alpha", "warmup", "steps", "threads", "device", "seed")}
    out = []
    for dtype in args.dtypes:
        out.append(dict(shape, side="floor", dtype=dtype, variant="-", compile=False))
        for variant in args.variants:
            for side in ("peft", "peftkit"):
                out.append(dict(shape, side=side, dtype=dtype, variant=variant, compile=False))
            if args.compile:
                out.append(dict(shape, side="peftkit", dtype=dtype, variant=variant, compile=True))
            if args.sdpa_rows:
                out.append(dict(shape, side="peftkit", dtype=dtype, variant=variant, compile=False, sdpa=True))
    return out


def _label(spec: dict) -> str:
    return spec["side"] + ("+compile" if spec["compile"] else "") + ("/sdpa" if spec.get("sdpa") else "")


def run_child(spec: dict, timeout: float) -> dict:
    return run_fresh(__file__, spec, timeout, child_env())


def _combine(spec_runs: list[dict]) -> dict:
    """One configuration's fresh-process runs as one result: the median of each run's median
    step time and CPU time, the largest peak; every run's numbers are kept under "runs"."""
    good = [r for r in spec_runs if "error" not in r]
    if not good:
        return spec_runs[0]
    out = dict(good[0])
    out["s_per_step"] = statistics.median(r["s_per_step"] for r in good)
    out["cpu_s_per_step"] = statistics.median(r["cpu_s_per_step"] for r in good)
    out["peak_mb"] = max(r["peak_mb"] for r in good)
    if len(spec_runs) > 1:
        out["runs"] = spec_runs
    return out


def _find(results, side, dtype, variant, compile=False, sdpa=False):
    for r in results:
        s = r["spec"]
        if (s["side"] == side and s["dtype"] == dtype and s["variant"] == variant and s["compile"] == compile
                and s.get("sdpa", False) == sdpa and "error" not in r):
            return r
    return None


def add_ratios(results: list[dict]) -> None:
    """Ratios vs peft (same dtype and variant) and vs the same side's plain LoRA."""
    for r in results:
        if "error" in r:
            continue
        s = r["spec"]
        peft_r = _find(results, "peft", s["dtype"], s["variant"])
        if peft_r is not None and s["side"] != "peft":
            r["time_vs_peft"] = r["s_per_step"] / peft_r["s_per_step"]
            r["cpu_vs_peft"] = r["cpu_s_per_step"] / peft_r["cpu_s_per_step"]
            r["peak_vs_peft"] = r["peak_mb"] / peft_r["peak_mb"]
        lora_r = _find(results, s["side"], s["dtype"], "lora", s["compile"], s.get("sdpa", False))
        if lora_r is not None and s["variant"] in ("lora+dropout0.1", "dora"):
            r["time_vs_own_lora"] = r["s_per_step"] / lora_r["s_per_step"]
            r["cpu_vs_own_lora"] = r["cpu_s_per_step"] / lora_r["cpu_s_per_step"]


def target_checks(results: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    checks = []
    for dtype in DTYPES:
        for side in ("peftkit", "peftkit+compile"):
            compiled = side.endswith("compile")
            r = _find(results, "peftkit", dtype, "lora", compiled)
            if r is None or "time_vs_peft" not in r:
                continue
            checks.append(dict(what=f"{dtype} lora {side}: time / peft", value=r["time_vs_peft"],
                               cpu_value=r["cpu_vs_peft"], limit=TIME_TARGET[dtype]))
            checks.append(dict(what=f"{dtype} lora {side}: peak / peft", value=r["peak_vs_peft"], limit=MEM_TARGET[dtype]))
            for variant, limit in (("lora+dropout0.1", DROPOUT_TARGET), ("dora", DORA_TARGET)):
                v = _find(results, "peftkit", dtype, variant, compiled)
                if v is not None and "time_vs_own_lora" in v:
                    checks.append(dict(what=f"{dtype} {variant} {side}: time / own lora", value=v["time_vs_own_lora"],
                                       cpu_value=v["cpu_vs_own_lora"], limit=limit))
    for c in checks:
        c["met"] = c["value"] <= c["limit"]
    return checks


def print_table(results: list[dict], checks: list[dict]) -> None:
    head = (f"{'dtype':5} {'variant':16} {'side':16} {'s/step':>7} {'cpu s':>6} {'peak MB':>8} {'model MB':>8} "
            f"{'loss':>7} {'t/peft':>7} {'cpu/peft':>8} {'mem/peft':>8} {'t/lora':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["spec"]
        if "error" in r:
            print(f"{s['dtype']:5} {s['variant']:16} {_label(s):16} ERROR {r['error']}")
            continue

        def fmt(key, width):
            return f"{r[key]:{width}.2f}" if key in r else " " * (width - 1) + "-"

        print(f"{s['dtype']:5} {s['variant']:16} {_label(s):16} {r['s_per_step']:7.3f} {r['cpu_s_per_step']:6.2f} "
              f"{r['peak_mb']:8.0f} {r['model_mb']:8.0f} {r['loss']:7.3f} {fmt('time_vs_peft', 7)} "
              f"{fmt('cpu_vs_peft', 8)} {fmt('peak_vs_peft', 8)} {fmt('time_vs_own_lora', 7)}")
    if checks:
        print("\ntargets (wall-time ratio; the CPU-time ratio in brackets)")
        for c in checks:
            cpu = f" [{c['cpu_value']:.2f}]" if "cpu_value" in c else "       "
            print(f"  {c['what']:52} {c['value']:5.2f}{cpu} <= {c['limit']:.2f}  {'met' if c['met'] else 'MISSED'}")


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "allocator": os.environ.get("LD_PRELOAD") or "glibc malloc (default)"}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        import peft
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (compile runs need >= 1)")
    p.add_argument("--steps", type=int, default=5, help="measured steps; the median is reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: untested on the reference machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="also run peftkit with torch.compile on each decoder layer")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh-process runs per configuration, in round-robin order; the median is reported")
    p.add_argument("--sdpa-rows", action="store_true",
                   help="also run peftkit with the model's own SDPA attention (no attention kernel)")
    p.add_argument("--paired", action="store_true",
                   help="instead: peftkit's --variants in one process per dtype, stepping in turn; each "
                        "variant's time relative to the first (use --steps 10 or more)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) and print JSON
    args = p.parse_args(argv)
    problems = below_one(args, ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch", "r", "steps",
                                "threads", "repeats"))
    if args.warmup < 0:
        problems.append(f"--warmup={args.warmup} must be >= 0")
    if args.hidden % args.heads:
        problems.append(f"--hidden={args.hidden} must be a multiple of --heads={args.heads}")
    if args.device not in ("cpu", "cuda"):
        problems.append(f"--device={args.device!r}: use cpu or cuda")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return answer_one(args.one, run_one)
    info = machine()
    print(f"machine: {info}")
    print(f"shape: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate {args.intermediate}, "
          f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}; LoRA r={args.r} alpha={args.alpha:g} all-linear; "
          f"{args.warmup} warm-up + {args.steps} measured steps; {args.threads} threads\n")
    if args.paired:
        return main_paired(args, info)
    specs = configurations(args)
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(args.repeats):  # round-robin: a slow spell of the machine hits every configuration
        for spec, spec_runs in zip(specs, runs):
            t0 = time.perf_counter()
            r = run_child(spec, args.timeout)
            spec_runs.append(r)
            status = r.get("error") or f"{r['s_per_step']:.3f} s/step, peak {r['peak_mb']:.0f} MB"
            print(f"  {round_ + 1}/{args.repeats} {spec['dtype']} {spec['variant']:16} {_label(spec):16} {status}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results = [dict(_combine(spec_runs), spec=spec) for spec, spec_runs in zip(specs, runs)]
    add_ratios(results)
    checks = target_checks(results)
    print()
    print_table(results, checks)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": results,
                                               "targets": checks}, indent=2))
        print(f"\nwrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


def main_paired(args, info: dict) -> int:
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch",
                                            "r", "alpha", "warmup", "steps", "threads", "device", "seed")}
    base = args.variants[0]
    print(f"peftkit, one process per dtype, variants stepping in turn; ratios to {base} (CPU-time ratio in brackets)")
    results = {}
    for dtype in args.dtypes:
        r = run_child(dict(shape, dtype=dtype, paired=args.variants), args.timeout)
        results[dtype] = r
        if "error" in r:
            print(f"{dtype:5} ERROR {r['error']}")
            continue
        for variant in args.variants:
            v, b = r[variant], r[base]
            ratio = "" if variant == base else (f"{v['s_per_step'] / b['s_per_step']:5.2f} "
                                                f"[{v['cpu_s_per_step'] / b['cpu_s_per_step']:.2f}]")
            print(f"{dtype:5} {variant:16} {v['s_per_step']:7.3f} s/step  {v['cpu_s_per_step']:6.2f} cpu s  "
                  f"loss {v['loss']:.3f}  {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "paired": results}, indent=2))
        print(f"\nwrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
