"""Opt-in fast attention: `enable_fast_attention` routes a model's SDPA calls to kernels.attention
for training forwards; `get_peft_model` alone leaves the model's attention as it was."""
from __future__ import annotations

import copy
import gc
import importlib
import json

import pytest
import torch

import tiny_models
from one_thread import one_torch_thread  # noqa: F401  (autouse)
from peftkit import (LoraConfig, PeftModel, disable_fast_attention, enable_fast_attention, fast_attention_enabled,
                     get_peft_model)
from peftkit import _private_apis, fast_attention
from peftkit.kernels import fast_paths

attention_kernels = importlib.import_module("peftkit.kernels.attention")  # the module (the package exports a function)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the q shapes of the attention kernel's fast-path calls, those on one-row batches
    aside (PeftModel's chunked loss checks a model's head with a one-row forward, once per model)."""
    calls = []
    fast = attention_kernels._attention_torch

    def spy(q, k, v, bias, scale):
        if q.shape[0] > 1:
            calls.append(tuple(q.shape))
        return fast(q, k, v, bias, scale)

    monkeypatch.setattr(attention_kernels, "_attention_torch", spy)
    return calls


@pytest.fixture(autouse=True)
def native_16bit(monkeypatch):
    """The kernel is taken only on CPUs with native bf16/fp16 GEMMs; these tests check the routing
    and its results on any CPU, so they run as if this one had them (one test checks the gate)."""
    from peftkit.kernels import _gemm

    monkeypatch.setattr(_gemm, "_NATIVE_16BIT", {torch.bfloat16: True, torch.float16: True})


@pytest.fixture(autouse=True)
def no_model_left_routed():
    yield
    # Whatever a test routed is released by disable / unload or, at the latest, garbage collection:
    # the table is transformers' again.
    gc.collect()
    assert not fast_attention._marked and _private_apis.global_attention_function("sdpa") is sdpa_entry()


def sdpa_entry():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def lora(base, seed=1, route=True):
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    if route:
        enable_fast_attention(model)
    return model


def batch(vocab=64, seq=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq - 4:] = 0  # right padding: a 4-D mask reaches the attention
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, data, fast=True):
    model.train()
    for p in model.parameters():
        p.grad = None
    with fast_paths(fast):
        loss = model(**data).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


def test_get_peft_model_leaves_the_attention_as_it_was(kernel_calls, tmp_path):
    base = tiny_models.llama().to(torch.bfloat16)
    model = lora(base, route=False)
    assert base.config._attn_implementation == "sdpa"
    assert _private_apis.global_attention_function("sdpa") is sdpa_entry()
    assert not fast_attention_enabled(model)
    loss_and_grads(model, batch())
    assert kernel_calls == []  # a bf16 training forward: the kernel would apply if routed

    lora(tiny_models.llama(), route=False).save_pretrained(tmp_path)
    PeftModel.from_pretrained(tiny_models.llama().to(torch.bfloat16), tmp_path, is_trainable=True)
    assert _private_apis.global_attention_function("sdpa") is sdpa_entry()


def test_enable_routes_and_unload_merge_and_disable_undo_it(kernel_calls, tmp_path):
    data = batch()
    for undo in ("merge_and_unload", "unload", "disable"):
        base = tiny_models.llama().to(torch.bfloat16)
        model = lora(base, route=False)
        assert enable_fast_attention(model) == 1 and fast_attention_enabled(model)
        assert enable_fast_attention(model) == 1  # idempotent
        assert base.config._attn_implementation == "sdpa"  # the name stays: model code testing it is unaffected
        kernel_calls.clear()
        loss_and_grads(model, data)
        assert kernel_calls == [(3, 4, 12, 8)] * 2, undo
        if undo == "disable":
            disable_fast_attention(model)
            plain = model
        else:
            plain = getattr(model, undo)()
        assert not fast_attention_enabled(plain) and not fast_attention_enabled(model)
        assert _private_apis.global_attention_function("sdpa") is sdpa_entry(), undo  # the table as it was
        kernel_calls.clear()
        plain.train()(**data)
        assert kernel_calls == [], undo
    base.save_pretrained(tmp_path)
    assert "peftkit" not in (tmp_path / "config.json").read_text()

    eager = tiny_models.llama(attn_implementation="eager")
    assert enable_fast_attention(lora(eager, route=False)) == 0  # only SDPA is rerouted
    assert eager.config._attn_implementation == "eager" and _private_apis.global_attention_function("sdpa") is sdpa_entry()


def test_only_the_routed_model_takes_the_kernel(kernel_calls):
    """The dispatcher hands other models' calls to transformers' SDPA unchanged; the table gets
    its entry back when the last routed model is released."""
    data = batch()
    routed = lora(tiny_models.llama().to(torch.bfloat16))
    other = lora(tiny_models.llama().to(torch.bfloat16), route=False)
    assert _private_apis.global_attention_function("sdpa") is fast_attention._dispatch_sdpa
    before = loss_and_grads(other, data)
    assert kernel_calls == []
    loss_and_grads(routed, data)
    assert len(kernel_calls) == 2
    disable_fast_attention(routed)
    assert _private_apis.global_attention_function("sdpa") is sdpa_entry()
    after = loss_and_grads(other, data)
    assert torch.equal(before[0], after[0])


def test_kernel_runs_for_bf16_train_mode_forwards_only(kernel_calls):
    model = lora(tiny_models.llama().to(torch.bfloat16))
    data = batch()
    loss_and_grads(model, data)
    assert kernel_calls == [(3, 4, 12, 8)] * 2  # both layers, GQA k/v repeated to 4 heads

    kernel_calls.clear()
    with torch.no_grad():
        model.eval()(**data)  # eval mode (inference, generation): SDPA
    loss_and_grads(model, data, fast=False)  # fast paths off: SDPA
    assert kernel_calls == []

    fp32 = lora(tiny_models.llama())
    loss_and_grads(fp32, data)  # fp32: SDPA (the kernel is not faster there on CPU)
    assert kernel_calls == []


def test_kernel_steps_aside_without_native_16bit_gemms(kernel_calls, monkeypatch):
    """Where bf16 is multiplied by torch's slow fallback (no AVX512_BF16 / AMX), SDPA is faster."""
    from peftkit.kernels import _gemm

    monkeypatch.setattr(_gemm, "_NATIVE_16BIT", {torch.bfloat16: False, torch.float16: False})
    loss_and_grads(lora(tiny_models.llama().to(torch.bfloat16)), batch())
    assert kernel_calls == []


def test_kernel_steps_aside_for_long_keys_and_attention_dropout(kernel_calls, monkeypatch):
    data = batch()
    monkeypatch.setattr(fast_attention, "MAX_KV_LEN", 11)
    loss_and_grads(lora(tiny_models.llama().to(torch.bfloat16)), data)
    assert kernel_calls == []
    monkeypatch.undo()
    loss_and_grads(lora(tiny_models.llama(attention_dropout=0.1).to(torch.bfloat16)), data)
    assert kernel_calls == []


def bert_without_dropout():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("model_fn", [tiny_models.llama, bert_without_dropout], ids=["llama-gqa-causal", "bert-padding"])
def test_routed_model_equals_sdpa_in_fp32(model_fn, monkeypatch, kernel_calls):
    """With the fp32 gate opened, the routed model computes the same loss and adapter gradients
    as transformers' SDPA: masks, causality, GQA and scaling are carried over exactly."""
    monkeypatch.setattr(fast_attention, "_DTYPES", (torch.float32,))
    data = batch()
    if model_fn is bert_without_dropout:
        data["labels"] = torch.tensor([0, 2, 1])
    assert_routed_equals_sdpa(lora(model_fn()), data, kernel_calls)


def assert_routed_equals_sdpa(model, data, kernel_calls):
    routed = loss_and_grads(model, data)
    assert len(kernel_calls) == 2  # both layers took the kernel
    sdpa = loss_and_grads(model, data, fast=False)
    torch.testing.assert_close(routed[0], sdpa[0], rtol=1e-6, atol=1e-6)
    for name, grad in sdpa[1].items():
        torch.testing.assert_close(routed[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_training_gradients_within_bf16_error_of_sdpa():
    """bf16 model: loss and adapter gradients against the same weights in fp32; the routed
    attention's error is of the size SDPA's own bf16 error is."""
    base32 = tiny_models.llama(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    base16 = copy.deepcopy(base32).to(torch.bfloat16)
    base32.load_state_dict({k: v.float() for k, v in base16.state_dict().items()})
    m16, m32 = lora(base16), lora(base32)
    data = batch(seq=48)
    ref = loss_and_grads(m32, data, fast=False)
    errors = {}
    for fast in (True, False):
        loss, grads = loss_and_grads(m16, data, fast=fast)
        rel = max(float((grads[n] - g).norm() / g.norm()) for n, g in ref[1].items())
        errors[fast] = (abs(float(loss - ref[0])), rel)
    assert errors[True][0] < 5e-3 and errors[True][1] < 8e-2, errors
    assert errors[True][1] < 2.5 * errors[False][1], errors
    print(json.dumps({str(k): v for k, v in errors.items()}))


def test_compiled_layers_keep_the_kernel_without_graph_breaks(kernel_calls):
    """torch.compile (fullgraph, aot_eager: traced like inductor, no C++ build) of each decoder
    layer keeps the routed attention as one op and equals the eager run."""
    from peftkit.kernels.compile import compile_decoder_layers

    torch._dynamo.reset()
    data = batch()
    eager = loss_and_grads(lora(tiny_models.llama().to(torch.bfloat16)), data)
    assert len(kernel_calls) == 2
    compiled_model = lora(tiny_models.llama().to(torch.bfloat16))
    compile_decoder_layers(compiled_model, backend="aot_eager", fullgraph=True)  # raises on a graph break
    compiled = loss_and_grads(compiled_model, data)
    assert len(kernel_calls) > 2  # reached while tracing the compiled layers
    disable_fast_attention(compiled_model)
    kernel_calls.clear()
    loss_and_grads(compiled_model, data)  # the compiled layers recompile (guards) onto SDPA
    torch._dynamo.reset()
    assert kernel_calls == []
    # Same ops in the same order (measured: identical bits); SDPA instead would differ at the
    # 1e-2 level of bf16 rounding.
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=0)
    for name, g in eager[1].items():
        torch.testing.assert_close(compiled[1][name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


def test_packed_rows_with_the_collators_block_mask_equal_sdpa(monkeypatch, kernel_calls):
    """A packed batch (position_ids restarting per row, the collator's additive 4-D block mask)
    gives SDPA's loss and gradients through the kernel (fp32 gate opened for exactness)."""
    from peftkit.data.collate import block_causal_mask

    monkeypatch.setattr(fast_attention, "_DTYPES", (torch.float32,))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    data = {"input_ids": ids, "position_ids": position_ids, "attention_mask": block_causal_mask(position_ids),
            "labels": ids.masked_fill(position_ids == 0, -100)}
    assert_routed_equals_sdpa(lora(tiny_models.llama()), data, kernel_calls)


def test_reentrant_checkpointing_recomputes_through_the_same_kernel(kernel_calls):
    """Reentrant activation checkpointing runs the forward without grad and recomputes it
    with grad: both passes take the kernel (train mode decides), so the gradients are those
    of the run without checkpointing."""
    data = batch()
    plain = loss_and_grads(lora(tiny_models.llama().to(torch.bfloat16)), data)
    base = tiny_models.llama().to(torch.bfloat16)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    kernel_calls.clear()
    checkpointed = loss_and_grads(lora(base), data)
    assert len(kernel_calls) == 4  # two layers, each forward and recomputation
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for name, g in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], g, rtol=0, atol=0, msg=name)


def test_models_that_test_the_name_sdpa_keep_it(kernel_calls):
    """Falcon's code has branched on `_attn_implementation == "sdpa"`: the name is never changed
    (neither by get_peft_model nor by enable_fast_attention), and attaching an adapter leaves
    its outputs bit for bit as they were."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    base = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                                          new_decoder_architecture=False, attn_implementation="sdpa"))
    base = base.to(torch.bfloat16).train()
    data = batch()
    data.pop("labels")
    before = base(**data).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))  # B = 0: the same function
    assert base.config._attn_implementation == "sdpa"
    assert torch.equal(model(**data).logits, before)
    assert kernel_calls == []
    enable_fast_attention(model)
    assert base.config._attn_implementation == "sdpa"
    model.unload()
    assert torch.equal(base(**data).logits, before)


def test_fp32_float_mask_on_a_bf16_model_stays_finite(kernel_calls):
    """fp32's lowest value rounds to -inf in bf16; a fully masked query row must still give a
    finite output (not the NaN of softmax over -inf only)."""
    module = torch.nn.Module().train()
    q, k, v = (torch.randn(2, 2, 4, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1] = torch.finfo(torch.float32).min  # query 1 sees no key
    out, _ = fast_attention.peftkit_sdpa_attention(module, q, k, v, mask, is_causal=False)
    assert len(kernel_calls) == 1 and torch.isfinite(out).all()


def test_fp32_model_under_bf16_autocast_takes_the_kernel_like_sdpa_does(kernel_calls):
    """peftkit's loop with precision bf16 on CPU: fp32 weights under autocast. SDPA then runs
    in bf16 (CPU autocast's list), and so does the kernel; against the fp32 run without
    autocast, its error is of the size of SDPA's own."""
    data = batch(seq=48)
    model = lora(tiny_models.llama(hidden_size=64, intermediate_size=128))
    exact = loss_and_grads(model, data, fast=False)
    errors = {}
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = loss_and_grads(model, data, fast=fast)
        rel = max(float((grads[n] - g).norm() / g.norm()) for n, g in exact[1].items())
        errors[fast] = (abs(float(loss - exact[0])), rel)
    assert len(kernel_calls) == 2
    assert errors[True][0] < 5e-3 and errors[True][1] < 8e-2, errors
    assert errors[True][1] < 2.5 * errors[False][1], errors


def test_unload_gives_sdpa_back_even_while_an_ejected_layer_is_held():
    from peftkit import LoraConfig, enable_fast_attention, get_peft_model
    from peftkit._private_apis import global_attention_function
    from tiny_models import llama

    before = global_attention_function("sdpa")
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    held = model.get_base_model().model.layers[0].self_attn.q_proj  # the adapter layer, kept alive
    assert enable_fast_attention(model) > 0
    assert global_attention_function("sdpa") is not before
    model.unload()
    assert global_attention_function("sdpa") is before
    assert held is not None

