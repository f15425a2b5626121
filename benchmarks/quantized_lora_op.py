"""One LoRA-adapted linear layer on a quantized base: forward + backward, three ways.

  plain     the base layer's own forward (it dequantizes, and dequantizes again in backward)
            plus the LoRA branch from torch ops: what peftkit runs on quantized layers
  keep      `lora_linear` with the weight dequantized once per forward and kept for backward
  fused     `lora_linear` given the torchao NF4 weight itself: the op casts it to the compute
            dtype on use, so it dequantizes in forward and again in backward and keeps nothing

Columns: best-of-N ms per forward+backward (process CPU time, one thread) and the MiB autograd
saves for backward (saved_tensors_hooks; quantized storage not counted): "keep" holds a
dequantized weight per layer until backward, a whole dequantized model over a step.

    python benchmarks/quantized_lora_op.py [--dtype fp32|bf16] [--tokens 128] [--in 2048] [--out 5632]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from peftkit.kernels import lora_linear
from peftkit.methods import quantized_base
from peftkit.recipe.quantization import quiet_backend_import


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--in", dest="in_features", type=int, default=2048)
    p.add_argument("--out", dest="out_features", type=int, default=5632)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with quiet_backend_import():
        import bitsandbytes as bnb
        from torchao.quantization import to_nf4

    torch.manual_seed(0)
    n_in, n_out = args.in_features, args.out_features
    weight = torch.randn(n_out, n_in) / n_in**0.5
    lora_A = (torch.randn(args.rank, n_in) / n_in**0.5).requires_grad_()
    lora_B = (torch.randn(n_out, args.rank) * 0.01).requires_grad_()
    x0 = torch.randn(args.tokens, n_in, dtype=dtype)

    def bnb_4bit() -> nn.Module:
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        return layer.to("cpu")

    def torchao_nf4() -> nn.Module:
        layer = nn.Linear(n_in, n_out, bias=False)
        layer.weight = nn.Parameter(to_nf4(weight.to(dtype)), requires_grad=False)
        return layer

    def plain(layer, x):
        return (layer(x) + (x.to(lora_A.dtype) @ lora_A.t() @ lora_B.t()) * 2.0).to(dtype)

    def keep(layer, x):
        return lora_linear(x, quantized_base.dequantized_weight(layer, dtype), None, lora_A, lora_B, 2.0)

    def fused(layer, x):
        return lora_linear(x, layer.weight, None, lora_A, lora_B, 2.0)

    cases = [("bitsandbytes nf4", bnb_4bit, "plain", plain), ("bitsandbytes nf4", bnb_4bit, "keep", keep),
             ("torchao nf4", torchao_nf4, "plain", plain), ("torchao nf4", torchao_nf4, "keep", keep),
             ("torchao nf4", torchao_nf4, "fused", fused)]
    print(f"{args.tokens} tokens x {n_in} -> {n_out}, r={args.rank}, {args.dtype}, 1 thread")
    print(f"{'base':18} {'way':6} {'ms fwd+bwd':>11} {'saved MiB':>10}")
    for base_name, make, way, step in cases:
        layer = make()
        times, saved = [], 0
        for _ in range(args.iters + 1):
            x = x0.clone().requires_grad_()
            counted = [0]

            def pack(t):
                if not hasattr(t, "quantized_data"):  # torchao's NF4 storage is the base's own
                    counted[0] += t.numel() * t.element_size()
                return t

            start = time.process_time()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = step(layer, x)
            y.float().sum().backward()
            times.append(time.process_time() - start)
            saved = counted[0]
        print(f"{base_name:18} {way:6} {min(times[1:]) * 1e3:11.1f} {saved / 2**20:10.1f}")


if __name__ == "__main__":
    main()
