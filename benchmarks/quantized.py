"""Quantized bases (QLoRA): peftkit against peft on the same 4-bit base, and both on the bf16 base.

The base is a Llama built from a config (random weights, no download; default hidden 2048, 6
layers, intermediate 5632, vocab 32000: 0.44B parameters, 0.88 GB in bf16), saved once in bf16
to a cache folder (`--cache-dir`, reused between runs) with one initial LoRA adapter (r=16,
alpha 32, dropout 0, every projection: q/k/v/o/gate/up/down; peft's default init: A random,
B zero). Every configuration runs in a fresh process, loads that folder, attaches that adapter
(`from_pretrained(..., is_trainable=True)` on both sides), and trains it with the same plain
loop (AdamW on the trainable parameters, lr 1e-3, no weight decay) on the same random token
batches:

  base nf4    4-bit NF4 linear layers (bitsandbytes, compute dtype bf16; embeddings, norms and
              head stay bf16), loaded from the bf16 checkpoint:
      peft             transformers `from_pretrained(quantization_config=BitsAndBytesConfig(
                       load_in_4bit, nf4, compute bf16))` + `peft.prepare_model_for_kbit_training`
                       (freeze, every non-4-bit parameter to fp32, input grads, checkpointing):
                       the QLoRA recipe as peft documents it
      peftkit          `peftkit.recipe.quantization.load_quantized_model` (transformers' quantizing
                       load fed weight by weight: each read, quantized and freed; glibc told to give
                       freed buffers >= 1 MiB back) + gradient checkpointing, no fp32 upcast
                       (peftkit's own recipe: the norms, embeddings and head stay bf16)
      peftkit+prepare  `load_quantized_model` + peftkit's `prepare_model_for_kbit_training`
                       (peft's recipe, fp32 upcast included: the same computation as peft's row)
  base bf16   the same checkpoint unquantized, gradient checkpointing, no upcast:
      peft / peftkit   `from_pretrained(dtype=bf16)` + the adapter

Gradient checkpointing is on in every row, the same way: transformers' reentrant checkpointing
of each decoder layer (`gradient_checkpointing_enable({"use_reentrant": True})` and
`enable_input_require_grads()`, which `prepare_model_for_kbit_training` does on both sides).

Timing: wall and CPU time between the ends of consecutive optimizer steps; the first `--warmup`
steps are not measured, the median of the next `--steps` is reported. Memory (from
/proc/self/status): `peak above imports` = VmHWM at the end minus VmRSS after importing
everything (torch, transformers, bitsandbytes, peft, peftkit: the same imports on every side),
so it includes loading; `train peak` = the peak after the model was ready (VmHWM reset through
/proc/self/clear_refs, where the kernel allows it), also above the imports; a sampling thread
(every 5 ms) records RssAnon and RssFile at the highest RSS it saw (both above their values
after the imports), and RSS after loading and after attaching the adapter.

    python benchmarks/quantized.py                       # every row, 2 fresh-process runs each
    python benchmarks/quantized.py --rows peft:nf4 peftkit:nf4 --repeats 1 --json out.json
    python benchmarks/quantized.py --tiny --in-process   # seconds: does it run (the test)
    python benchmarks/quantized.py --rows peft:nf4 peftkit:nf4 --diagnose-rows peftkit:nf4 \
        --diagnose-pread --diagnose-mmap-threshold 4194304 --diagnose-colmajor-grad   # the fixes, measured

The --diagnose-* options patch the chosen rows' processes with changes neither library makes
today (benchmarks/README.md says why each one matters); their rows are starred in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import answer_one, below_one, child_env, loadavg, machine as bench_machine, run_fresh

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
ROWS = ("peft:nf4", "peftkit:nf4", "peftkit+prepare:nf4", "peft:bf16", "peftkit:bf16")
SHAPE = dict(hidden=2048, layers=6, heads=16, kv_heads=16, intermediate=5632, vocab=32000)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256)
TARGETS = {"nf4_vs_bf16_peak": 0.6, "time_vs_peft": 0.9, "peak_vs_peft": 0.9}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- child process
def _status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024 / MB
    return out


def _reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux: '5' to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Samples /proc/self/status; keeps the sample with the highest VmRSS (its RssAnon/RssFile)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.best, self._done = interval, {"VmRSS": 0.0}, threading.Event()

    def run(self):
        while not self._done.is_set():
            s = _status()
            if s["VmRSS"] > self.best["VmRSS"]:
                self.best = s
            time.sleep(self.interval)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return self.best


def _import_everything() -> None:
    """The same imports on every side, so that the RSS baseline is the same."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import peftkit  # noqa: F401
    import peftkit.recipe.quantization  # noqa: F401


def lora_config_kwargs(spec: dict) -> dict:
    return dict(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0, target_modules=PROJECTIONS,
                task_type="CAUSAL_LM")


def make_base(spec: dict, folder: str) -> None:
    """The bf16 checkpoint and the initial adapter (folder/adapter), once per shape."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"], max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    torch.manual_seed(spec["seed"] + 1)
    peft.get_peft_model(model, peft.LoraConfig(**lora_config_kwargs(spec))).save_pretrained(
        os.path.join(folder, "adapter"))


def token_batches(spec: dict):
    import torch

    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    return [torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)
            for _ in range(spec["warmup"] + spec["steps"])]


def _checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def load_row(spec: dict):
    """The model of one row with the initial adapter, ready to train."""
    import torch

    path, adapter = spec["base_dir"], os.path.join(spec["base_dir"], "adapter")
    side, base = spec["side"], spec["base"]
    bnb_kwargs = {"bits": 4, "type": "nf4", "double_quant": False, "compute_dtype": "bf16", "backend": "bitsandbytes"}
    stages = {}
    if base == "bf16":  # the same on both sides
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        stages["loaded"] = _status()
        _checkpointing(model)
    elif side == "peft":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map="cpu")
        stages["loaded"] = _status()
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        from peftkit.recipe.quantization import load_quantized_model, prepare_model_for_kbit_training

        model = load_quantized_model(path, bnb_kwargs, dtype=torch.bfloat16)
        stages["loaded"] = _status()
        if side == "peftkit+prepare":
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            _checkpointing(model)
    stages["prepared"] = _status()
    if side == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    else:
        import peftkit

        model = peftkit.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    stages["adapter"] = _status()
    model.train()
    return model, stages


def apply_diagnostics(spec: dict) -> None:
    """The `--diagnose-*` changes (benchmarks/README.md: "Why the targets were missed at c086e38"), applied in this process
    to whichever rows run with them: not what either library does today."""
    import ctypes

    import torch

    if spec.get("pread"):  # transformers reads each tensor into its own buffer instead of mmapping the file
        import transformers.modeling_utils as modeling_utils

        safe_open = modeling_utils.safe_open

        def pread_open(file, framework="pt", device="cpu", backend=None):
            return safe_open(file, framework=framework, device=device, backend="pread")

        modeling_utils.safe_open = pread_open
    if spec.get("mmap_threshold"):  # glibc M_MMAP_THRESHOLD (-3): large buffers go back to the OS when freed
        if ctypes.CDLL("libc.so.6").mallopt(-3, int(spec["mmap_threshold"])) != 1:
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    if spec.get("colmajor_grad"):  # bf16 input gradients with a column-major gradient operand
        import bitsandbytes.autograd._functions as bnb_autograd
        import bitsandbytes.functional as bnb_functional

        import peftkit.kernels._gemm as gemm
        import peftkit.kernels.cross_entropy as cross_entropy

        backward = bnb_autograd.MatMul4Bit.backward

        def matmul4bit_backward(ctx, grad_output):
            if ctx.is_empty or not ctx.needs_input_grad[0] or any(ctx.needs_input_grad[1:4]):
                return backward(ctx, grad_output)
            weight = bnb_functional.dequantize_4bit(ctx.tensors[1], ctx.state).to(grad_output.dtype)  # [out, in]
            g = grad_output.reshape(-1, grad_output.shape[-1])
            grad = torch.mm(g.t().contiguous().t(), weight)
            return grad.view(*grad_output.shape[:-1], weight.shape[1]), None, None, None, None

        bnb_autograd.MatMul4Bit.backward = staticmethod(matmul4bit_backward)
        linear_nt = gemm.linear_nt

        def colmajor_linear_nt(x, weight, bias=None):
            if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and weight.t().is_contiguous():
                x = x.t().contiguous().t()
            return linear_nt(x, weight, bias)

        cross_entropy.linear_nt = colmajor_linear_nt


def run_one(spec: dict) -> dict:
    import torch

    _import_everything()
    apply_diagnostics(spec)
    imports = _status()
    load_start = loadavg()
    torch.set_num_threads(spec["threads"])
    sampler = _Sampler()
    sampler.start()
    model, stages = load_row(spec)
    load_peak = _status()["VmHWM"]
    reset = _reset_peak()
    batches = token_batches(spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0)
    walls, cpus, losses = [time.perf_counter()], [time.process_time()], []
    for ids in batches:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        walls.append(time.perf_counter())
        cpus.append(time.process_time())
    end = _status()
    at_peak = sampler.stop()
    w = spec["warmup"]
    wall_steps = [b - a for a, b in zip(walls, walls[1:])]
    cpu_steps = [b - a for a, b in zip(cpus, cpus[1:])]
    base_rss = imports["VmRSS"]
    return {
        "s_per_step": statistics.median(wall_steps[w:]),
        "cpu_s_per_step": statistics.median(cpu_steps[w:]),
        "step_times": wall_steps[w:],
        "warmup_times": wall_steps[:w],
        "imports_mb": base_rss,
        "peak_above_imports_mb": end["VmHWM"] - base_rss if not reset else max(load_peak, end["VmHWM"]) - base_rss,
        "load_peak_above_imports_mb": load_peak - base_rss,
        "train_peak_above_imports_mb": end["VmHWM"] - base_rss if reset else None,
        "at_peak_above_imports": {"rss": at_peak["VmRSS"] - base_rss,
                                  "anon": at_peak.get("RssAnon", 0) - imports["RssAnon"],
                                  "file": at_peak.get("RssFile", 0) - imports["RssFile"]},
        "stages_above_imports": {k: {"rss": v["VmRSS"] - base_rss, "anon": v["RssAnon"] - imports["RssAnon"],
                                     "file": v["RssFile"] - imports["RssFile"]} for k, v in stages.items()},
        "end_above_imports": {"rss": end["VmRSS"] - base_rss, "anon": end["RssAnon"] - imports["RssAnon"],
                              "file": end["RssFile"] - imports["RssFile"]},
        "losses": losses,
        "loss": losses[-1],
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }


# --------------------------------------------------------------------------- parent process
def run_child(payload: dict, timeout: float, in_process: bool) -> dict:
    if in_process:  # one process for every row: a quick check, the memory numbers are then meaningless
        if payload.get("init"):
            make_base(payload, payload["base_dir"])
            return {"ok": True}
        return dict(run_one(payload), in_process=True)
    return run_fresh(__file__, payload, timeout, child_env(TOKENIZERS_PARALLELISM="false"))


def base_spec(args) -> dict:
    shape = TINY if args.tiny else dict(SHAPE, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                                       vocab=args.vocab)
    return dict(shape, r=args.r, seed=args.seed, batch=args.batch, seq=args.seq, warmup=args.warmup, steps=args.steps,
                lr=args.lr, threads=args.threads)


def diagnostics(args) -> dict:
    return dict(pread=args.diagnose_pread, mmap_threshold=args.diagnose_mmap_threshold,
                colmajor_grad=args.diagnose_colmajor_grad)


def ensure_base(spec: dict, args) -> str:
    """The cached bf16 checkpoint + initial adapter for this shape (made once, in a child)."""
    name = "llama-h{hidden}-l{layers}-i{intermediate}-v{vocab}-r{r}-s{seed}".format(**spec)
    folder = Path(args.cache_dir) / name
    if (folder / "adapter" / "adapter_config.json").exists():
        return str(folder)
    tmp = tempfile.mkdtemp(prefix=name + ".", dir=args.cache_dir)
    r = run_child(dict(spec, init=True, base_dir=tmp), args.timeout, args.in_process)
    if "error" in r:
        raise SystemExit(f"making the base model failed: {r['error']}\n{r.get('stderr', '')}")
    os.replace(tmp, folder)  # complete or absent
    return str(folder)


def _combine(results: list[dict]) -> dict:
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]
    out = dict(good[0])
    for k in ("s_per_step", "cpu_s_per_step"):
        out[k] = statistics.median(r[k] for r in good)
    for k in ("peak_above_imports_mb", "load_peak_above_imports_mb", "train_peak_above_imports_mb"):
        if all(r.get(k) is not None for r in good):
            out[k] = max(r[k] for r in good)
    out["runs"] = results
    return out


def ratios(results: dict) -> dict:
    """The issue's three targets, where both rows ran."""
    out = {}

    def ok(*keys):
        return all(k in results and "error" not in results[k] for k in keys)

    if any(r.get("in_process") for r in results.values()):  # one process: the peaks are the whole run's
        return _time_ratios(results, ok)

    if ok("peftkit:nf4", "peftkit:bf16"):
        out["peftkit nf4 peak / peftkit bf16 peak"] = (results["peftkit:nf4"]["peak_above_imports_mb"]
                                                       / results["peftkit:bf16"]["peak_above_imports_mb"],
                                                       TARGETS["nf4_vs_bf16_peak"])
    if ok("peft:nf4", "peft:bf16"):
        out["peft nf4 peak / peft bf16 peak"] = (results["peft:nf4"]["peak_above_imports_mb"]
                                                 / results["peft:bf16"]["peak_above_imports_mb"], None)
    out.update(_time_ratios(results, ok))
    for kit in ("peftkit:nf4", "peftkit+prepare:nf4"):
        if ok(kit, "peft:nf4"):
            name = kit.split(":")[0]
            out[f"{name} nf4 peak / peft nf4 peak"] = (results[kit]["peak_above_imports_mb"]
                                                       / results["peft:nf4"]["peak_above_imports_mb"],
                                                       TARGETS["peak_vs_peft"])
    if ok("peftkit:bf16", "peft:bf16"):
        out["peftkit bf16 peak / peft bf16 peak"] = (results["peftkit:bf16"]["peak_above_imports_mb"]
                                                     / results["peft:bf16"]["peak_above_imports_mb"], None)
    return out


def _time_ratios(results: dict, ok) -> dict:
    out = {}
    for kit in ("peftkit:nf4", "peftkit+prepare:nf4"):
        if ok(kit, "peft:nf4"):
            out[f"{kit.split(':')[0]} nf4 time / peft nf4 time"] = (
                results[kit]["s_per_step"] / results["peft:nf4"]["s_per_step"], TARGETS["time_vs_peft"])
    if ok("peftkit:bf16", "peft:bf16"):
        out["peftkit bf16 time / peft bf16 time"] = (results["peftkit:bf16"]["s_per_step"]
                                                     / results["peft:bf16"]["s_per_step"], None)
    return out


def print_table(results: dict, rows: list[str]) -> None:
    head = (f"{'row':20} {'s/step':>8} {'cpu s':>7} {'peak>imp':>9} {'load pk':>8} {'train pk':>9} "
            f"{'anon@pk':>8} {'file@pk':>8} {'loss':>10}")
    print(head)
    print("-" * len(head))
    for key in rows:
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            print(f"{key:20} ERROR {r['error']}")
            continue
        if r.get("diagnostics"):
            key = key + "*"
        train = r.get("train_peak_above_imports_mb")
        at = r["at_peak_above_imports"]
        print(f"{key:20} {r['s_per_step']:8.2f} {r['cpu_s_per_step']:7.2f} {r['peak_above_imports_mb']:9.0f} "
              f"{r['load_peak_above_imports_mb']:8.0f} {train if train is not None else float('nan'):9.0f} "
              f"{at['anon']:8.0f} {at['file']:8.0f} {r['loss']:10.5f}")
    if any(r.get("diagnostics") for r in results.values()):
        print("* = with the --diagnose-* changes (the ratios below compare these rows as they ran)")
    print()
    for name, (value, target) in ratios(results).items():
        verdict = "" if target is None else f"  target <= {target}: {'met' if value <= target else 'MISSED'}"
        print(f"{name:42} {value:6.3f}{verdict}")


def machine() -> dict:
    return bench_machine(("torch", "transformers", "peft", "bitsandbytes"), cpu_flags=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="side:base rows to run")
    p.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    p.add_argument("--layers", type=int, default=SHAPE["layers"])
    p.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    p.add_argument("--vocab", type=int, default=SHAPE["vocab"])
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, vocab 256 (the test's shape)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16,
                   help="tokens per row (default 16: on a CPU without bf16 GEMM a bf16 backward matmul costs "
                        "~0.2 s per token at this width)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (>= 1)")
    p.add_argument("--steps", type=int, default=3, help="measured steps; the median is reported")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs per row, round-robin")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "peftkit-bench-quantized"),
                   help="where the bf16 checkpoint and the initial adapter are kept between runs")
    p.add_argument("--diagnose-pread", action="store_true",
                   help="diagnostic, every row: transformers reads the checkpoint with safetensors' pread backend "
                        "instead of mmap (what a quantizing loader could do)")
    p.add_argument("--diagnose-mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="diagnostic, every row: glibc mallopt(M_MMAP_THRESHOLD, BYTES) so that freed large "
                        "temporaries go back to the OS (as MALLOC_MMAP_THRESHOLD_=BYTES would)")
    p.add_argument("--diagnose-colmajor-grad", action="store_true",
                   help="diagnostic, every row: bitsandbytes' 4-bit backward and peftkit's chunked-loss backward "
                        "multiply a column-major bf16 gradient (fast on CPUs without bf16 GEMM; peftkit does both "
                        "itself since 0df8aed / c086e38, so this now changes only peft rows)")
    p.add_argument("--diagnose-rows", nargs="+", choices=ROWS,
                   help="the rows the --diagnose-* options apply to (default: every row)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--in-process", action="store_true",
                   help="every row in this one process (the test: losses and times only, memory is meaningless)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON)
    args = p.parse_args(argv)
    problems = below_one(args, ("warmup", "steps", "threads", "repeats", "batch", "r"))
    if args.seq < 2:
        problems.append(f"--seq={args.seq} must be >= 2 (the loss predicts the next token)")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return answer_one(args.one, run_one, init=lambda payload: make_base(payload, payload["base_dir"]))
    info = machine()
    print(f"machine: {info}")
    spec = base_spec(args)
    if any(diagnostics(args).values()):
        print(f"DIAGNOSTIC RUN (not what the libraries do today): {diagnostics(args)} on "
              f"{', '.join(args.diagnose_rows or args.rows)}")
    print(f"Llama hidden {spec['hidden']}, {spec['layers']} layers, intermediate {spec['intermediate']}, vocab "
          f"{spec['vocab']}; LoRA r={spec['r']} on {', '.join(PROJECTIONS)}; batch {spec['batch']} x {spec['seq']} "
          f"tokens; {args.warmup} warm-up + {args.steps} measured steps, {args.threads} thread(s)\n")
    os.makedirs(args.cache_dir, exist_ok=True)
    base_dir = ensure_base(spec, args)
    collected: dict[str, list[dict]] = {}
    for round_ in range(args.repeats):
        order = args.rows if round_ % 2 == 0 else list(reversed(args.rows))
        for key in order:
            side, base = key.split(":")
            t0 = time.perf_counter()
            diagnose = diagnostics(args) if key in (args.diagnose_rows or args.rows) else {}
            payload = dict(spec, side=side, base=base, base_dir=base_dir, **diagnose)
            r = run_child(payload, args.timeout, args.in_process)
            if any(diagnose.values()):
                r["diagnostics"] = diagnose
            collected.setdefault(key, []).append(r)
            status = r.get("error") or (f"{r['s_per_step']:.2f} s/step, peak {r['peak_above_imports_mb']:.0f} MB "
                                        f"above imports, loss {r['loss']:.5f}, "
                                        f"load {' '.join(r['loadavg_start'] or [])}")
            print(f"  {round_ + 1}/{args.repeats} {key:20} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {k: _combine(v) for k, v in collected.items()}
    print()
    print_table(results, args.rows)
    info["loadavg_end"] = loadavg()
    print(f"\nload average at start {info['loadavg']}, at end {info['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "args": vars(args), "spec": spec, "results": results,
             "ratios": {k: {"value": v, "target": t} for k, (v, t) in ratios(results).items()}}, indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
