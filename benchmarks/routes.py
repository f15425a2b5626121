"""Training routes: peftkit against peft on the same route, same model, data and steps.

A route is the loop a user trains with. Each one is run twice, once with a peftkit model and
once with a peft model, on the same base model (same seed), the same initial adapter weights
(one adapter made by peft, saved, and loaded on both sides with `from_pretrained(...,
is_trainable=True)`), the same random token batches in the same order and the same optimizer
settings:

  own-loop    peftkit: `peftkit.train.train` (its defaults: attention kernel on, chunked loss)
              peft:    peft + stock `transformers.Trainer` (the same run as the trainer route's
                       peft side, reported under both routes)
  trainer     peftkit: `peftkit.integrations.Trainer`;  peft: stock `transformers.Trainer`
  plain       `loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()`
  accelerate  the same loop through `Accelerator.prepare` / `accelerator.backward`
  trl         peftkit: `peftkit.integrations.SFTTrainer(model=peftkit model)`
              peft:    `trl.SFTTrainer(model=plain model, peft_config=peft.LoraConfig(...))`
              (TRL's fused lm-head on both sides; TRL's defaults otherwise, so gradient
              checkpointing is on, on both sides; the adapter TRL creates is overwritten
              with the shared initial weights before training)

With `--floor`, each (width, dtype) also runs `base alone` on the plain loop: the frozen base
model with no adapter at all, its linear layers on peftkit's GEMM route (`kernels._gemm.linear_nt`,
as the fused LoRA op's base product), its loss by peftkit's chunked loss
(`kernels.causal_lm_loss`), the backward flowing from the loss down to the first decoder layer's
output, no optimizer step. It skips the adapter's own products, the first layer's backward and
the optimizer, and keeps the rest of the model's own computation (norms, rotary, activation, the
model's SDPA attention), so its time against peft's plain loop is a lower bound for every row
that runs the model's SDPA (all fp32 rows; in bf16 the own loop and `peftkit+fa` rows use
peftkit's attention kernel instead).

On the routes other than the own loop, the peftkit row is what `get_peft_model` alone gives
(chunked loss in train mode, the model's own SDPA attention); `peftkit+fa` rows (bf16 only:
the kernel does not apply to fp32) add `peftkit.enable_fast_attention(model)`.

Precision: fp32 = everything fp32; bf16 = base weights bf16 (built in bf16), adapter weights
fp32 (peft's `autocast_adapter_dtype=True` and peftkit's default), no autocast on any route
(Trainer/TRL `bf16=False`: the weights decide; TRL's own default would add a bf16 autocast).

Each (route, side, width, dtype) runs in a fresh process. Timing: the wall/CPU time between
the ends of consecutive optimizer steps (a Trainer callback, the own loop's `on_step_end`,
or the loop itself), so it includes the route's data loading and bookkeeping; the first
`--warmup` steps are not measured, the median of the next `--steps` is reported. Memory: the
process's peak RSS (ru_maxrss) at the end of the last step (before any end-of-run saving);
`above imp` subtracts the RSS after importing everything (torch, transformers, peft, peftkit,
accelerate, datasets, trl: the same imports on every side). Loss: the last step's training
loss as the route reports it (Trainer/TRL: log_history with logging_steps=1; own loop:
StepInfo.loss; plain/accelerate: loss.item()).

    python benchmarks/routes.py                                  # widths a and b, fp32 + bf16, every route
    python benchmarks/routes.py --widths a --dtypes bf16 --routes plain trainer --json out.json
    python benchmarks/routes.py --widths tiny --steps 1 --warmup 1   # seconds: does it run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_common import answer_one, below_one, child_env, loadavg, machine as bench_machine, run_fresh

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

ROUTES = ("own-loop", "trainer", "plain", "accelerate", "trl")
DTYPES = ("fp32", "bf16")
# a: the repo's benchmark shape (train_step.py); b: SmolLM-135M's width (hidden 576, 9 heads,
# 3 KV heads, intermediate 1536, vocab 49152, tied embeddings) with 12 of its 30 layers by
# default (--b-layers); tiny: for the test.
WIDTHS = {
    "a": dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376, vocab=32000, tie=False,
              seq=256, batch=4, r=16, alpha=32, dropout=0.0),
    "b": dict(hidden=576, layers=12, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tie=True,
              seq=256, batch=4, r=16, alpha=32, dropout=0.05),
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=128, tie=False,
                 seq=16, batch=2, r=4, alpha=8, dropout=0.0),
}
TIME_TARGET = {"bf16": 0.6, "fp32": 0.85}
MEM_TARGET = {"bf16": 0.7, "fp32": 0.8}


# --------------------------------------------------------------------------- child process
def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux


def _import_everything() -> None:
    """The same imports on every side, so that the RSS baseline is the same."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import peftkit  # noqa: F401
    import peftkit.integrations  # noqa: F401
    import peftkit.train  # noqa: F401

    try:
        import trl  # noqa: F401

        import peftkit.integrations.trl  # noqa: F401
    except ImportError:
        pass


def lora_kwargs(spec: dict) -> dict:
    return dict(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules="all-linear",
                task_type="CAUSAL_LM")


def build_base(spec: dict, dtype=None):
    """The frozen base model: a Llama built from a config (no download), seeded, in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if dtype is None:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    config = LlamaConfig(
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
        max_position_embeddings=max(2048, spec["seq"]), tie_word_embeddings=spec["tie"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # built in dtype: no fp32 copy first
    model.train()
    return model


def make_initial_adapter(spec: dict, folder: str) -> None:
    """The shared initial adapter: peft's default LoRA init (A random, B zero) on the fp32 model."""
    import peft
    import torch

    model = build_base(spec, torch.float32)
    torch.manual_seed(spec["seed"] + 1)
    peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs(spec))).save_pretrained(folder)


def token_batches(spec: dict):
    """`warmup + steps` batches of random token ids [batch, seq] (fixed generator)."""
    import torch

    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    n = spec["warmup"] + spec["steps"]
    return [torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen) for _ in range(n)]


class _Clock:
    """Wall time, CPU time and peak RSS at the end of each optimizer step."""

    def __init__(self):
        self.walls, self.cpus, self.peaks, self.losses = [], [], [], []

    def start(self):
        self.walls.append(time.perf_counter())
        self.cpus.append(time.process_time())
        self.peaks.append(_peak_mb())

    def step_end(self, loss: float | None = None):
        self.start()
        if loss is not None:
            self.losses.append(loss)


def _attach(spec: dict, base, adapter_dir: str):
    """The model with the shared initial adapter, on this side (TRL's peft side: the plain model)."""
    if spec["side"] == "floor":
        return base.requires_grad_(False)  # frozen, as under an adapter
    if spec["side"] == "peft":
        if spec["route"] == "trl":
            return base  # TRL wraps it itself (peft_config); the weights are loaded after
        import peft

        return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    import peftkit

    model = peftkit.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    if spec.get("fa"):
        peftkit.enable_fast_attention(model)
    return model


def _training_args(spec: dict, out: str, trl_config: bool = False):
    common = dict(output_dir=out, max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=spec["batch"],
                  learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  logging_steps=1, save_strategy="no", report_to=[], seed=spec["seed"], use_cpu=True, bf16=False,
                  dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential")
    if trl_config:
        import trl

        return trl.SFTConfig(**common, max_length=max(1024, spec["seq"]))
    from transformers import TrainingArguments

    return TrainingArguments(**common, remove_unused_columns=False)


def _trainer_callback(clock: _Clock):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()  # not used for timing (the first step is never measured); keeps indices aligned

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    return StepClock()


def _tokenizer(vocab: int):
    """A word-level tokenizer that only names pad/bos/eos ids 0-2 (the data is token ids already)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def run_route(spec: dict, model, batches, adapter_dir: str, workdir: str) -> _Clock:
    clock = _Clock()
    route, side = spec["route"], spec["side"]
    rows = [{"input_ids": ids.tolist(), "attention_mask": [1] * ids.numel(), "labels": ids.tolist()}
            for batch in batches for ids in batch]

    if route == "own-loop" and side == "peftkit":
        from peftkit.train import TrainConfig, train

        config = TrainConfig(output_dir=workdir, max_steps=len(batches), micro_batch_size=spec["batch"],
                             lr=spec["lr"], scheduler="constant", shuffle=False, save_every=0, progress=False,
                             log_every=len(batches), seed=spec["seed"], precision="auto")  # auto: fp32 on CPU
        clock.start()
        train(model, rows, None, config, on_step_end=lambda info: clock.step_end(info.loss))
        return clock

    if route in ("own-loop", "trainer"):  # own-loop's peft side is peft + transformers.Trainer
        import datasets
        from transformers import Trainer, default_data_collator

        trainer_cls = Trainer
        if side == "peftkit":
            from peftkit.integrations import Trainer as trainer_cls
        trainer = trainer_cls(model=model, args=_training_args(spec, workdir),
                              train_dataset=datasets.Dataset.from_list(rows), data_collator=default_data_collator,
                              callbacks=[_trainer_callback(clock)])
        trainer.train()
        clock.losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return clock

    if route == "trl":
        import datasets

        data = datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
        kwargs = dict(args=_training_args(spec, workdir, trl_config=True), train_dataset=data,
                      processing_class=_tokenizer(spec["vocab"]), callbacks=[_trainer_callback(clock)])
        if side == "peft":
            import peft
            import trl
            from safetensors.torch import load_file

            trainer = trl.SFTTrainer(model=model, peft_config=peft.LoraConfig(**lora_kwargs(spec)), **kwargs)
            state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
            result = peft.set_peft_model_state_dict(trainer.model, state)
            assert not result.unexpected_keys, result.unexpected_keys
        else:
            from peftkit.integrations import SFTTrainer

            trainer = SFTTrainer(model=model, **kwargs)
        trainer.train()
        clock.losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return clock

    if side == "floor":
        return _base_alone(model, batches, clock)

    # plain and accelerate: the user's own loop
    accelerator = None
    if route == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    step = plain_step(model, spec["lr"], accelerator)
    clock.start()
    for ids in batches:
        clock.step_end(step(ids))
    return clock


def _base_alone(model, batches, clock: _Clock) -> _Clock:
    step = base_alone_step(model)
    clock.start()
    for ids in batches:
        clock.step_end(step(ids))
    return clock


def base_alone_step(model):
    """The floor's step function (ids -> loss): forward + backward of the frozen base with the
    chunked loss, no adapter. The first decoder layer's output is made to require grad, so the
    backward runs through every layer above it, as an adapter's gradients need it to."""
    import torch

    from peftkit.kernels import causal_lm_loss

    def needs_grad(module, args, output):
        (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

    model.model.layers[0].register_forward_hook(needs_grad)
    _through_fast_gemm(model.model)

    def step(ids) -> float:
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
        loss_sum, n = causal_lm_loss(hidden, model.lm_head.weight, ids)
        loss = loss_sum / n
        loss.backward()
        return loss.item()

    return step


def plain_step(model, lr: float, accelerator=None):
    """The plain loop's step function (ids -> loss), AdamW over the trainable parameters; with an
    `accelerator`, model and optimizer go through `prepare` and the backward through it."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    backward = torch.Tensor.backward
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
        backward = accelerator.backward
    model.train()

    def step(ids) -> float:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _through_fast_gemm(backbone) -> None:
    """The backbone's frozen nn.Linear layers computed as the fused LoRA op computes its base
    product: forward and input gradient by `kernels._gemm.linear_nt` (oneDNN for fp32 on AVX-512
    CPUs, fp32 products for bf16 on CPUs without native bf16 GEMMs), so that the floor runs on
    the GEMMs the peftkit rows run on."""
    import torch

    from peftkit.kernels._gemm import linear_nt

    class FrozenLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(weight)
            y = linear_nt(x.reshape(-1, x.shape[-1]), weight, bias)
            return y.view(*x.shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            grad_x = linear_nt(grad.reshape(-1, grad.shape[-1]), weight.t())
            return grad_x.view(*grad.shape[:-1], weight.shape[1]), None, None

    for module in backbone.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = lambda x, m=module: FrozenLinear.apply(x, m.weight, m.bias)


def _loss_path(spec: dict, model) -> str:
    if spec["route"] == "trl":
        return "trl fused lm-head"
    if spec["side"] == "peft":
        return "full logits"
    if spec["side"] == "floor":
        return "chunked, no adapter"
    import torch

    ids = torch.zeros(spec["batch"], spec["seq"], dtype=torch.long)
    blocker = model.chunked_loss_blocker({"input_ids": ids, "labels": ids})
    return "chunked" if blocker is None else f"full logits ({blocker})"


def _attention(spec: dict, model) -> str:
    if spec["side"] == "peftkit" and (spec.get("fa") or spec["route"] == "own-loop"):
        return "peftkit kernel" if spec["dtype"] == "bf16" else "sdpa (kernel is bf16-only)"
    return "sdpa"


def run_one(spec: dict) -> dict:
    import torch

    _import_everything()
    imports_mb = _rss_now_mb()
    load_start = loadavg()
    torch.set_num_threads(spec["threads"])
    if spec.get("no_onednn"):  # peftkit's large fp32 matmuls then run on torch.mm (MKL), as peft's do
        torch.backends.mkldnn.enabled = False
    base = build_base(spec)
    model = _attach(spec, base, spec["adapter_dir"])
    model_mb = _rss_now_mb()
    batches = token_batches(spec)
    loss_path, attention = _loss_path(spec, model), _attention(spec, model)
    with tempfile.TemporaryDirectory(prefix="routes-") as workdir:
        clock = run_route(spec, model, batches, spec["adapter_dir"], workdir)
    n = spec["warmup"] + spec["steps"]
    assert len(clock.walls) == n + 1 and len(clock.losses) == n, (len(clock.walls), len(clock.losses))
    walls = [b - a for a, b in zip(clock.walls, clock.walls[1:])]
    cpus = [b - a for a, b in zip(clock.cpus, clock.cpus[1:])]
    w = spec["warmup"]
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return {
        "s_per_step": statistics.median(walls[w:]),
        "cpu_s_per_step": statistics.median(cpus[w:]),
        "step_times": walls[w:],
        "warmup_times": walls[:w],
        "peak_mb": clock.peaks[-1],
        "imports_mb": imports_mb,
        "model_mb": model_mb,
        "peak_above_imports_mb": clock.peaks[-1] - imports_mb,
        "losses": clock.losses,
        "loss": clock.losses[-1],
        "first_loss": clock.losses[0],
        "loss_path": loss_path,
        "attention": attention,
        "trainable_dtypes": adapter_dtypes,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }


# --------------------------------------------------------------------------- parent process
def run_child(payload: dict, timeout: float, in_process: bool = False) -> dict:
    if in_process:  # --in-process: no fresh process (a quick check; peak RSS is then cumulative)
        import traceback

        try:
            if payload.get("init"):
                make_initial_adapter(payload, payload["adapter_dir"])
                return {"ok": True}
            return dict(run_one(payload), in_process=True)
        except Exception as e:  # noqa: BLE001 - reported like a failed child
            return {"error": f"{type(e).__name__}: {e}", "stderr": traceback.format_exc()[-4000:]}
    return run_fresh(__file__, payload, timeout, child_env(TOKENIZERS_PARALLELISM="false"))


def width_spec(args, width: str) -> dict:
    spec = dict(WIDTHS[width], width=width)
    if width == "b":
        spec["layers"], spec["dropout"] = args.b_layers, args.b_dropout
    if args.seq:
        spec["seq"] = args.seq
    if args.batch:
        spec["batch"] = args.batch
    return dict(spec, warmup=args.warmup, steps=args.steps, threads=args.threads, seed=args.seed, lr=args.lr,
                no_onednn=args.no_onednn)


def runs(args) -> list[dict]:
    """Every (width, dtype, route, side) process to run; own-loop's peft side is the trainer
    route's peft run (peft + transformers.Trainer), run once."""
    out = []
    for width in args.widths:
        for dtype in args.dtypes:
            base = dict(width_spec(args, width), dtype=dtype)
            need_peft_trainer = False
            for route in args.routes:
                if route == "own-loop":
                    out.append(dict(base, route="own-loop", side="peftkit", fa=False))
                    need_peft_trainer = True
                    continue
                if route == "trainer":
                    need_peft_trainer = True
                else:
                    out.append(dict(base, route=route, side="peft", fa=False))
                out.append(dict(base, route=route, side="peftkit", fa=False))
                if dtype == "bf16" and args.fa_rows:
                    out.append(dict(base, route=route, side="peftkit", fa=True))
            if need_peft_trainer:
                out.append(dict(base, route="trainer", side="peft", fa=False))
            if args.floor and "plain" in args.routes:  # shown against plain's peft side
                out.append(dict(base, route="plain", side="floor", fa=False))
    return out


def label(spec: dict) -> str:
    if spec["side"] == "floor":
        return "base alone"
    return spec["side"] + ("+fa" if spec.get("fa") else "")


def _key(spec: dict) -> tuple:
    return spec["width"], spec["dtype"], spec["route"], spec["side"], bool(spec.get("fa"))


def _combine(results: list[dict]) -> dict:
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]
    out = dict(good[0])
    for k in ("s_per_step", "cpu_s_per_step"):
        out[k] = statistics.median(r[k] for r in good)
    for k in ("peak_mb", "peak_above_imports_mb"):
        out[k] = max(r[k] for r in good)
    if len(results) > 1:
        out["runs"] = results
    return out


def table_rows(results: dict, args) -> list[dict]:
    """One row per (width, dtype, route, side), peft first, with ratios to the route's peft row."""
    rows = []
    for width in args.widths:
        for dtype in args.dtypes:
            for route in args.routes:
                peft_key = (width, dtype, "trainer" if route == "own-loop" else route, "peft", False)
                sides = [peft_key, (width, dtype, route, "peftkit", False)]
                if dtype == "bf16" and args.fa_rows and route != "own-loop":
                    sides.append((width, dtype, route, "peftkit", True))
                if route == "plain":
                    sides.append((width, dtype, route, "floor", False))
                peft_r = results.get(peft_key)
                for key in sides:
                    r = results.get(key)
                    if r is None:
                        continue
                    row = dict(r, width=width, dtype=dtype, route=route,
                               side="peft" + (" (trainer)" if route == "own-loop" and key == peft_key else "")
                               if key == peft_key else label(dict(side=key[3], fa=key[4])))
                    if key != peft_key and peft_r is not None and "error" not in r and "error" not in peft_r:
                        row["time_vs_peft"] = r["s_per_step"] / peft_r["s_per_step"]
                        row["cpu_vs_peft"] = r["cpu_s_per_step"] / peft_r["cpu_s_per_step"]
                        row["loss_diff"] = r["loss"] - peft_r["loss"]
                        if key[3] != "floor":  # a bound to compare with, not a route
                            row["time_met"] = row["time_vs_peft"] <= TIME_TARGET[dtype]
                        if not r.get("in_process"):  # in one process the peak is the whole run's
                            row["peak_vs_peft"] = r["peak_mb"] / peft_r["peak_mb"]
                            row["above_imports_vs_peft"] = r["peak_above_imports_mb"] / peft_r["peak_above_imports_mb"]
                            if key[3] != "floor":
                                row["peak_met"] = row["peak_vs_peft"] <= MEM_TARGET[dtype]
                    rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'w':2} {'dtype':5} {'route':10} {'side':15} {'s/step':>7} {'cpu s':>6} {'peak MB':>8} {'above imp':>9} "
            f"{'loss':>9} {'t/peft':>7} {'cpu/peft':>8} {'mem/peft':>8} {'imp/peft':>8}  targets")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['width']:2} {r['dtype']:5} {r['route']:10} {r['side']:15}"
        if "error" in r:
            print(f"{lead} ERROR {r['error']}")
            continue

        def fmt(key, width):
            return f"{r[key]:{width}.2f}" if key in r else " " * (width - 1) + "-"

        targets = ""
        if "time_met" in r:
            targets = f"time {'met' if r['time_met'] else 'MISSED'}"
        if "peak_met" in r:
            targets += f", mem {'met' if r['peak_met'] else 'MISSED'}"
        print(f"{lead} {r['s_per_step']:7.3f} {r['cpu_s_per_step']:6.2f} {r['peak_mb']:8.0f} "
              f"{r['peak_above_imports_mb']:9.0f} {r['loss']:9.5f} {fmt('time_vs_peft', 7)} {fmt('cpu_vs_peft', 8)} "
              f"{fmt('peak_vs_peft', 8)} {fmt('above_imports_vs_peft', 8)}  {targets}")


def machine() -> dict:
    return bench_machine(("torch", "transformers", "peft", "trl", "accelerate", "datasets"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routes", nargs="+", default=list(ROUTES), choices=ROUTES)
    p.add_argument("--widths", nargs="+", default=["a", "b"], choices=list(WIDTHS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--b-layers", type=int, default=12,
                   help="decoder layers of width b (SmolLM-135M has 30; 12 keeps a 2-core run under an hour)")
    p.add_argument("--b-dropout", type=float, default=0.05,
                   help="LoRA dropout of width b (0: the sides' losses then agree as closely as width a's)")
    p.add_argument("--seq", type=int, help="tokens per row (default: the width's, 256)")
    p.add_argument("--batch", type=int, help="rows per step (default: the width's, 4)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (>= 1)")
    p.add_argument("--steps", type=int, default=6, help="measured steps; the median is reported")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate on every route (constant)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh-process runs per configuration, round-robin; medians of the runs' medians")
    p.add_argument("--no-fa-rows", dest="fa_rows", action="store_false",
                   help="skip the bf16 peftkit+fa rows (enable_fast_attention on the non-own-loop routes)")
    p.add_argument("--no-onednn", action="store_true",
                   help="torch.backends.mkldnn.enabled = False in every process: peftkit's fp32 fast paths then use "
                        "torch.mm (MKL) instead of oneDNN (a diagnostic: on CPUs without AVX-512 oneDNN's fp32 "
                        "GEMM is the slower one; bf16 matmuls need oneDNN, so fp32 only)")
    p.add_argument("--floor", action="store_true",
                   help="also run `base alone` per width and dtype: the frozen base with the chunked loss and no "
                        "adapter on the plain loop, the lowest time any route can reach (shown against plain's peft)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this one process (a quick check, e.g. the test: the peak "
                        "memory is then the whole run's, not one configuration's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON)
    args = p.parse_args(argv)
    problems = below_one(args, ("warmup", "steps", "threads", "repeats", "b_layers", "seq", "batch"))
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return answer_one(args.one, run_one, init=lambda payload: make_initial_adapter(payload, payload["adapter_dir"]))
    info = machine()
    print(f"machine: {info}")
    for w in args.widths:
        s = width_spec(args, w)
        print(f"width {w}: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads ({s['kv_heads']} KV), "
              f"intermediate {s['intermediate']}, vocab {s['vocab']}{', tied' if s['tie'] else ''}, seq {s['seq']}, "
              f"batch {s['batch']}; LoRA r={s['r']} alpha={s['alpha']} dropout={s['dropout']} all-linear")
    print(f"{args.warmup} warm-up + {args.steps} measured steps, lr {args.lr:g}, {args.threads} threads\n")
    with tempfile.TemporaryDirectory(prefix="routes-adapters-") as tmp:
        adapter_dirs = {}
        for w in args.widths:
            adapter_dirs[w] = os.path.join(tmp, w)
            r = run_child(dict(width_spec(args, w), init=True, adapter_dir=adapter_dirs[w]), args.timeout,
                          args.in_process)
            if "error" in r:
                print(f"initial adapter for width {w}: ERROR {r['error']}\n{r.get('stderr', '')}")
                return 1
        specs = runs(args)
        collected: dict[tuple, list[dict]] = {}
        for round_ in range(args.repeats):
            # peft and peftkit of a cell run back to back; the order flips every round
            order = specs if round_ % 2 == 0 else _flip_pairs(specs)
            for spec in order:
                t0 = time.perf_counter()
                r = run_child(dict(spec, adapter_dir=adapter_dirs[spec["width"]]), args.timeout, args.in_process)
                collected.setdefault(_key(spec), []).append(r)
                status = r.get("error") or (f"{r['s_per_step']:.3f} s/step, peak {r['peak_mb']:.0f} MB, "
                                            f"loss {r['loss']:.5f}, load {' '.join(r['loadavg_start'] or [])}")
                print(f"  {round_ + 1}/{args.repeats} {spec['width']} {spec['dtype']} {spec['route']:10} "
                      f"{label(spec):10} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {k: _combine(v) for k, v in collected.items()}
    rows = table_rows(results, args)
    print()
    print_table(rows)
    info["loadavg_end"] = loadavg()
    print(f"\nload average at start {info['loadavg']}, at end {info['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


def _flip_pairs(specs: list[dict]) -> list[dict]:
    """The same runs with each cell's (width, dtype) order reversed, so peft and peftkit swap places."""
    cells: dict[tuple, list[dict]] = {}
    for s in specs:
        cells.setdefault((s["width"], s["dtype"]), []).append(s)
    return [s for cell in cells.values() for s in reversed(cell)]


if __name__ == "__main__":
    sys.exit(main())
