"""compile_decoder_layers: which modules it compiles, no graph breaks in the fused LoRA layer,
and a compiled training step equal to the eager one.

The equality test uses the "aot_eager" backend: it traces forward and backward through
AOTAutograd like inductor does (so graph breaks, guards and the autograd.Function all show up)
without inductor's C++ code generation, which costs ~30 s per layer class on a cold cache here.
The inductor run of the same test is opt-in: PEFTKIT_SLOW_TESTS=1.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import tiny_models
from peftkit import LoraConfig, get_peft_model
from peftkit.kernels.compile import compile_decoder_layers, find_decoder_layers
from peftkit.methods.lora.layer import Linear as LoraLinear


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_llama(seed=1, **lora):
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear")
    kwargs.update(lora)
    model = get_peft_model(tiny_models.llama(), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def test_finds_and_compiles_the_layer_stack_in_place():
    model = lora_llama()
    keys = list(model.state_dict())
    layers = find_decoder_layers(model)
    assert layers == list(model.base_model.model.model.layers)
    assert [type(m).__name__ for m in find_decoder_layers(tiny_models.gpt2())] == ["GPT2Block"] * 2
    assert compile_decoder_layers(model, backend="eager") == 2
    assert list(model.state_dict()) == keys  # in place: no `_orig_mod.` in parameter names
    assert all(layer._compiled_call_impl is not None for layer in layers)


def test_no_layer_stack_is_an_error_naming_the_children():
    with pytest.raises(ValueError, match=r"no nn.ModuleList.*'a \(Linear\)'"):
        compile_decoder_layers(_Plain())


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])  # not one class: not a layer stack


def _adapted_linear(**lora) -> LoraLinear:
    model = lora_llama(**lora)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    return layer


@pytest.mark.parametrize("variant", ["lora", "dora", "dropout"])
def test_fused_lora_linear_compiles_without_graph_breaks(variant):
    """Dropout included: under aot_eager the traced seed draw uses torch's generator as eager
    does, so the same seed gives the same mask and the compiled result equals the eager one."""
    layer = _adapted_linear(use_dora=variant == "dora", lora_dropout=0.5 if variant == "dropout" else 0.0)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # raises on a graph break
    torch.manual_seed(7)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    x_grad = x.grad.clone()
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    torch.manual_seed(7)
    eager = layer(x)
    eager.square().sum().backward()
    if variant == "dropout":
        layer.eval()
        assert not torch.allclose(layer(x), eager)  # the mask did drop something
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_grad, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, [p.grad for p in layer.parameters() if p.requires_grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_mask_ops_run_the_eager_code():
    """The custom ops behind the compiled dropout path give the eager mask for a seed."""
    from peftkit.kernels.dropout_mask import _dropout_apply_op, _mask_mul_op, dropout_keep_mask

    x = torch.randn(6, 7, dtype=torch.bfloat16)
    xk, packed = _dropout_apply_op(x, torch.tensor([123]), 0.3)
    keep = dropout_keep_mask(123, (6, 7), 0.3, "cpu")
    assert torch.equal(xk, x * keep)
    t = torch.randn(6, 7, dtype=torch.bfloat16)
    assert torch.equal(_mask_mul_op(t, packed), t * keep)
    torch.library.opcheck(_dropout_apply_op, (x, torch.tensor([123]), 0.3))
    torch.library.opcheck(_mask_mul_op, (t, packed))


def _compiled_vs_eager(backend):
    batch_g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 9), generator=batch_g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = []
    for compiled in (False, True):
        model = lora_llama()
        if compiled:
            assert compile_decoder_layers(model, backend=backend) == 2
        loss, n = model.chunked_causal_lm_loss(batch)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (eager_loss, eager_grads), (comp_loss, comp_grads) = results
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=0)
    assert comp_grads.keys() == eager_grads.keys()
    for k, g in eager_grads.items():
        torch.testing.assert_close(comp_grads[k], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=k)


def test_compiled_step_equals_eager():
    _compiled_vs_eager("aot_eager")


@pytest.mark.skipif(os.environ.get("PEFTKIT_SLOW_TESTS") != "1", reason="inductor compile ~30 s+; PEFTKIT_SLOW_TESTS=1")
def test_compiled_step_equals_eager_inductor():
    _compiled_vs_eager("inductor")
