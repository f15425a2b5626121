"""Micro-benchmark of peftkit's fast paths against their references (and against peft).

LoRA linear: forward+backward of one adapted linear (tokens x in -> out, r=16), for
  reference  plain F.linear / F.dropout composition (`lora_linear_reference`)
  peft       peft's own lora.Linear module (upcasts x to the adapter dtype, nn.Dropout copy)
  fast       `lora_linear` (saves x once, regenerates the dropout mask, keeps x·Aᵀ)
Loss: lm_head + cross-entropy (`linear_cross_entropy` vs the full-logits reference).
Attention: causal softmax attention in transformers' layout ([B, S, H, D] memory seen as
  [B, H, S, D]), for
  sdpa       torch's scaled_dot_product_attention(is_causal=True) (what transformers' "sdpa" runs)
  reference  the eager composition (`attention_reference`: matmul, softmax in fp32, matmul)
  fast       `attention` (per-batch GEMMs, probabilities kept for backward)

Columns: median wall and process-CPU ms per forward+backward; "saved MiB": bytes of the
distinct storages autograd keeps for backward (saved_tensors_hooks; parameters excluded),
deterministic; "peak MiB": peak of live bytes allocated inside the step (tracked per op
through a dispatch mode; parameters and pre-existing inputs excluded), deterministic as well.
On a shared, loaded machine prefer --threads 1 and the CPU column: wall time then mostly
measures the neighbours.

    python benchmarks/kernels_micro.py [--tokens 1024] [--iters 20] [--vocab 32000] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from peftkit.kernels import (  # noqa: E402
    attention,
    attention_reference,
    causal_bias,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    lora_linear,
    lora_linear_reference,
)

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by ops inside the mode that are alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._live or key in inputs:  # views alias what exists
                continue
            self._live.add(key)
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, size)
        return out

    def _release(self, key: int, size: int) -> None:
        self._live.discard(key)
        self.current -= size


def saved_bytes(step, params) -> int:
    """Bytes of distinct non-parameter storages saved for backward by `step()`'s forward."""
    skip = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = step()
    del out
    return sum(seen.values())


def timed(steps: dict[str, tuple], iters: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU) median ms of forward+backward per step. The steps run interleaved,
    round-robin, so that load from other processes hits every variant alike; process CPU time
    is less disturbed by such load than wall time (with one thread it is close to the work)."""

    def once(step, params) -> tuple[float, float]:
        for p in params:
            if p is not None:
                p.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        out, grad = step()
        out.backward(grad)
        return time.perf_counter() - wall, time.process_time() - cpu

    for step, params in steps.values():
        once(step, params)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, (step, params) in steps.items():
            times[name].append(once(step, params))
    return {
        name: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3)
        for name, t in times.items()
    }


def peak_bytes(step, params) -> int:
    for p in params:
        if p is not None:
            p.grad = None
    mode = LiveBytes()
    with mode:
        out, grad = step()
        out.backward(grad)
    return mode.peak


def lora_cases(tokens: int, in_f: int, out_f: int, r: int, dtype: torch.dtype, p: float):
    torch.manual_seed(0)
    x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)
    base = nn.Linear(in_f, out_f, bias=False).to(dtype).requires_grad_(False)
    A = nn.Parameter(torch.randn(r, in_f) / in_f**0.5)
    B = nn.Parameter(torch.randn(out_f, r) / r**0.5)
    g = torch.randn(tokens, out_f, dtype=dtype)
    scaling = 2.0
    params = [x, A, B]

    def fn(impl):
        return lambda: (impl(x, base.weight, None, A, B, scaling, p, True), g)

    cases = {"reference": (fn(lora_linear_reference), params, [base.weight, A, B])}
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        config = LoraConfig(r=r, lora_alpha=int(r * scaling), lora_dropout=p)
        peft_layer = PeftLinear(base, "default", config, r=r, lora_alpha=int(r * scaling), lora_dropout=p)
        peft_layer.lora_A["default"].weight = A
        peft_layer.lora_B["default"].weight = B
        peft_layer.train()
        cases["peft"] = (lambda: (peft_layer(x), g), params, [base.weight, A, B])
    except ImportError:
        pass
    cases["fast"] = (fn(lora_linear), params, [base.weight, A, B])
    return cases


def bench_lora(tokens: int, r: int, iters: int) -> None:
    print(f"\nLoRA linear, tokens={tokens}, r={r}, forward+backward (x, A, B get grads)")
    print(f"{'shape':>10} {'dtype':>5} {'drop':>5} {'impl':>10} {'wall ms':>8} {'cpu ms':>8} {'saved MiB':>10} {'peak MiB':>9}")
    for in_f, out_f in ((512, 512), (512, 1376)):
        for dtype in (torch.float32, torch.bfloat16):
            for p in (0.0, 0.05):
                cases = lora_cases(tokens, in_f, out_f, r, dtype, p)
                ms = timed({name: (step, grads) for name, (step, grads, _) in cases.items()}, iters)
                for name, (step, grads, params) in cases.items():
                    saved = saved_bytes(step, params) / MIB
                    peak = peak_bytes(step, grads) / MIB
                    shape = f"{in_f}->{out_f}"
                    dt = "fp32" if dtype == torch.float32 else "bf16"
                    print(f"{shape:>10} {dt:>5} {p:>5.2f} {name:>10} {ms[name][0]:>8.2f} {ms[name][1]:>8.2f} {saved:>10.2f} {peak:>9.2f}")


def bench_loss(tokens: int, hidden: int, vocab: int, iters: int) -> None:
    print(f"\nlm_head + cross-entropy, N={tokens}, H={hidden}, V={vocab}, frozen lm_head, grad wrt hidden")
    print(f"{'dtype':>5} {'impl':>10} {'wall ms':>8} {'cpu ms':>8} {'saved MiB':>10} {'peak MiB':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        h = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
        w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
        labels = torch.randint(0, vocab, (tokens,))
        impls = {"reference": linear_cross_entropy_reference, "fused": linear_cross_entropy}
        steps = {name: ((lambda impl=impl: (impl(h, w, labels), None)), [h]) for name, impl in impls.items()}
        ms = timed(steps, iters)
        for name, (step, _) in steps.items():
            saved = saved_bytes(step, [w]) / MIB
            peak = peak_bytes(step, [h]) / MIB
            dt = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{dt:>5} {name:>10} {ms[name][0]:>8.1f} {ms[name][1]:>8.1f} {saved:>10.2f} {peak:>9.2f}")


def bench_attention(batch: int, heads: int, head_dim: int, seqs: list[int], iters: int) -> None:
    print(f"\ncausal attention, B={batch}, H={heads}, D={head_dim}, forward + backward")
    print(f"{'dtype':>5} {'seq':>5} {'impl':>10} {'wall ms':>8} {'cpu ms':>8} {'saved MiB':>10} {'peak MiB':>9}")
    for dtype in (torch.bfloat16, torch.float32):
        for seq in seqs:
            torch.manual_seed(0)
            q, k, v = (torch.randn(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
                       for _ in range(3))
            grad = torch.randn(batch, heads, seq, head_dim, dtype=dtype)
            bias = causal_bias(seq, seq, dtype, q.device)[None, None]
            impls = {
                "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                "reference": lambda: attention_reference(q, k, v, bias),
                "fast": lambda: attention(q, k, v, bias),
            }
            steps = {name: ((lambda impl=impl: (impl(), grad)), [q, k, v]) for name, impl in impls.items()}
            ms = timed(steps, iters)
            for name, (step, params) in steps.items():
                saved = saved_bytes(step, []) / MIB
                peak = peak_bytes(step, params) / MIB
                dt = "fp32" if dtype == torch.float32 else "bf16"
                print(f"{dt:>5} {seq:>5} {name:>10} {ms[name][0]:>8.1f} {ms[name][1]:>8.1f} {saved:>10.2f} {peak:>9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4 * 256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--loss-iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", choices=("lora", "loss", "attention"), default=None)
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512, 1024], help="attention lengths")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "lora"):
        bench_lora(args.tokens, args.rank, args.iters)
    if args.only in (None, "loss"):
        bench_loss(args.tokens, 512, args.vocab, args.loss_iters)
    if args.only in (None, "attention"):
        bench_attention(max(1, args.tokens // 256), 8, 64, args.seqs, args.loss_iters)


if __name__ == "__main__":
    main()
