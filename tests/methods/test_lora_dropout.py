"""LoRA dropout draws the same masks with fast paths on and off (DESIGN.md, "Fast paths").

The fused op (`kernels.lora_linear`) draws a counter-based mask from a seed taken from torch's
global generator; the plain path of the LoRA layers (fast paths off, several active adapters,
DoRA with dropout) draws its mask the same way (`kernels.lora_linear.lora_dropout`), so turning
the fast paths off to debug a run reproduces it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_models
from one_thread import one_torch_thread  # noqa: F401  (autouse)
from peftkit import LoraConfig, get_peft_model
from peftkit.kernels import fast_paths

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}  # gpt2: Conv1D, fan_in_fan_out


def _model(arch: str, **lora):
    # init_lora_weights=False: B is non-zero, so the dropped branch changes outputs and A's grad
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=TARGETS[arch],
                        init_lora_weights=False, **lora)
    return get_peft_model(tiny_models.FACTORIES[arch](), config).train()


def _step(model, seed: int):
    """(loss, {name: grad}) of one training forward/backward under torch.manual_seed(seed)."""
    model.zero_grad(set_to_none=True)
    ids = tiny_models.inputs_for("llama")["input_ids"]
    torch.manual_seed(seed)
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_paths_on_and_off_draw_the_same_masks(arch):
    model = _model(arch)
    fast = _step(model, seed=7)
    with fast_paths(False):
        plain = _step(model, seed=7)
        other = _step(model, seed=8)
    _assert_same(fast, plain)
    assert (other[0] - plain[0]).abs() > 1e-4 * plain[0].abs()  # dropout is really active


def test_dora_with_dropout_uses_the_same_mask():
    # With its magnitude equal to the norm of W + s·B A (a fresh DoRA adapter), DoRA's scale is
    # exactly 1 and its output, dropout included, is LoRA's: the masks must be the fused op's.
    dora = _model("llama", use_dora=True)
    lora = _model("llama")
    lora.load_adapter_state("default", {k: v for k, v in dora.adapter_state_dict().items()
                                        if "lora_magnitude_vector" not in k})
    ours = _step(dora, seed=7)
    want = _step(lora, seed=7)  # the fused op's mask
    torch.testing.assert_close(ours[0], want[0], rtol=1e-5, atol=1e-6)
    with fast_paths(False):
        _assert_same(_step(dora, seed=7), ours)
