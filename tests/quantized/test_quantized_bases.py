"""Adapters on quantized bases (QLoRA): bitsandbytes 4-bit (nf4, fp4, double quantization) and
8-bit, torchao NF4. Checked against peft on the same quantized base, both ways, and against the
dequantized model (what the quantized layers compute).

Tolerance: both libraries run the same quantized base layers in fp32 here; only the order of the
adapter branch's sums differs (peft adds B·A·x after rounding it to the base's output dtype, peftkit
adds it in the adapters' dtype), so logits agree to fp32 rounding: 1e-5 of the largest logit.
8-bit layers run the same bitsandbytes calls on both sides, so they agree as well.
"""
from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn

import peftkit
from one_thread import one_torch_thread  # noqa: F401  (autouse)
from peftkit.methods.quantized_base import BNB_4BIT, BNB_8BIT, TORCHAO_NF4, quantized_layers
from peftkit.recipe.quantization import QuantizationConfig, load_quantized_model, prepare_model_for_kbit_training
from tiny_models import llama

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

BASES = {
    "nf4": ({"bits": 4, "type": "nf4"}, BNB_4BIT),
    "fp4-double": ({"bits": 4, "type": "fp4", "double_quant": True}, BNB_4BIT),
    "int8": ({"bits": 8}, BNB_8BIT),
    "torchao-nf4": ({"backend": "torchao"}, TORCHAO_NF4),
}
IDS = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    llama(seed=0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return str(path)


def quantized(base_dir: str, kind: str) -> nn.Module:
    model = load_quantized_model(base_dir, BASES[kind][0], dtype=torch.float32)
    return model.eval()


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits.float()


def assert_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max().item()


LORA_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
}


@pytest.mark.parametrize("kind,method", [("nf4", "lora"), ("nf4", "dora"), ("fp4-double", "rslora"), ("int8", "lora"),
                                         ("int8", "dora"), ("torchao-nf4", "lora")])
def test_lora_adapters_move_between_peft_and_peftkit_on_a_quantized_base(base_dir, tmp_path, kind, method):
    kwargs = LORA_CASES[method]
    # peft -> peftkit: a random (non-zero) adapter trained "by peft" loads with the same logits
    peft_model = peft.get_peft_model(quantized(base_dir, kind), peft.LoraConfig(init_lora_weights=False, **kwargs))
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "from-peft")
    ours = peftkit.PeftModel.from_pretrained(quantized(base_dir, kind), str(tmp_path / "from-peft")).eval()
    assert set(quantized_layers(ours).values()) == {BASES[kind][1]}
    assert_close(logits(ours), expected)
    # peftkit -> peft
    model = peftkit.get_peft_model(quantized(base_dir, kind), peftkit.LoraConfig(init_lora_weights=False, **kwargs))
    expected = logits(model.eval())
    model.save_pretrained(str(tmp_path / "from-peftkit"))
    theirs = peft.PeftModel.from_pretrained(quantized(base_dir, kind), tmp_path / "from-peftkit")
    assert_close(logits(theirs), expected)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_ia3_on_a_quantized_base_matches_peft(base_dir, tmp_path, kind):
    config = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    peft_model = peft.get_peft_model(quantized(base_dir, kind), peft.IA3Config(**config))
    peft_model.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(quantized(base_dir, kind), str(tmp_path)).eval()
    assert_close(logits(ours), logits(peft_model))


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-nf4"])
@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_training_reaches_every_adapter_matrix_and_leaves_the_base_frozen(base_dir, kind, method):
    configs = {"lora": peftkit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False),
               "dora": peftkit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                                          init_lora_weights=False),
               "loha": peftkit.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False),
               "lokr": peftkit.LoKrConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False)}
    model = peftkit.get_peft_model(quantized(base_dir, kind), configs[method]).train()
    # (torchao's NF4 clone re-quantizes with default block sizes that these tiny layers do not fit)
    before = {n: (p.get_original_weight() if hasattr(p, "get_original_weight") else p.detach().clone())
              for n, p in model.named_parameters() if not p.requires_grad}
    model(input_ids=IDS, labels=IDS).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), \
        [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    after = dict(model.named_parameters())
    assert all(torch.equal(p, after[n].get_original_weight() if hasattr(after[n], "get_original_weight") else after[n])
               for n, p in before.items())


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-nf4"])
@pytest.mark.parametrize("method", ["lora", "loha"])
def test_a_quantized_base_computes_what_its_dequantized_weights_do(base_dir, tmp_path, kind, method):
    """The adapter on the quantized base and on a plain copy holding the dequantized weights give
    the same logits (8-bit: LLM.int8() quantizes the activations row-wise too, ~0.5% of the largest
    logit here; 1e-2)."""
    config = (peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True)
              if method == "lora" else peftkit.LoHaConfig(r=4, target_modules=["q_proj", "gate_proj"], init_weights=False))
    model = peftkit.get_peft_model(quantized(base_dir, kind), config).eval()
    model.save_pretrained(str(tmp_path))
    plain = quantized(base_dir, kind)
    from peftkit.methods.quantized_base import dequantize_model

    assert dequantize_model(plain) and not quantized_layers(plain)
    reference = peftkit.PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    assert_close(logits(model), logits(reference), rel=1e-2 if kind == "int8" else 1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-nf4"])
def test_merge_and_unload_dequantizes_into_a_plain_model(base_dir, kind):
    model = peftkit.get_peft_model(quantized(base_dir, kind), peftkit.LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    expected = logits(model)
    merged = model.merge_and_unload(dtype=torch.float32)
    assert not quantized_layers(merged) and not hasattr(merged.config, "quantization_config")
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    assert_close(logits(merged), expected, rel=1e-2 if kind == "int8" else 1e-5)


def dist(a, b) -> float:
    return (a - b).abs().max().item()


def test_merge_and_unload_can_requantize(base_dir):
    model = peftkit.get_peft_model(quantized(base_dir, "nf4"), peftkit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    expected = logits(model)
    with model.disable_adapter():
        base = logits(model)
    merged = model.merge_and_unload(requantize=True)
    assert set(quantized_layers(merged).values()) == {BNB_4BIT}
    # W + dW is rounded to the 4-bit grid again: nearer the adapter's output than the base's, not equal
    assert 0 < dist(logits(merged), expected) < dist(logits(merged), base)
    with pytest.raises(ValueError, match="quantized base only"):
        peftkit.get_peft_model(llama(), peftkit.LoraConfig(target_modules=["q_proj"])).merge_and_unload(
            dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-nf4"])
@pytest.mark.parametrize("method", ["lora", "ia3", "loha"])
def test_merge_adapter_and_unmerge_on_a_quantized_base(base_dir, kind, method):
    """merge_adapter quantizes W + dW (rounded: near the adapter's output, not equal); unmerge
    puts the weight from before back, so the base is exactly what it was."""
    config = {"lora": peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
              "ia3": peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                       init_ia3_weights=False),
              "loha": peftkit.LoHaConfig(r=4, alpha=64, target_modules=["q_proj", "v_proj"], init_weights=False)}[method]
    model = peftkit.get_peft_model(quantized(base_dir, kind), config).eval()
    expected = logits(model)
    with model.disable_adapter():
        base = logits(model)
    model.merge_adapter()
    assert dist(logits(model), expected) < dist(logits(model), base) / 2
    model.unmerge_adapter()
    assert torch.equal(logits(model), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_keeps_the_models_dtype_by_default(base_dir, kind):
    model = load_quantized_model(base_dir, BASES[kind][0], dtype=torch.bfloat16)
    model = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules="all-linear")).eval()
    merged = model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(merged)).all()  # the merged layers and the rest agree on the dtype


def test_prepare_model_for_kbit_training_does_what_peft_does(base_dir):
    ours = prepare_model_for_kbit_training(load_quantized_model(base_dir, {"bits": 4}, dtype=torch.bfloat16))
    theirs = peft.prepare_model_for_kbit_training(load_quantized_model(base_dir, {"bits": 4}, dtype=torch.bfloat16))
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == \
        {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    embeddings_out = ours.get_input_embeddings()(IDS)
    assert embeddings_out.requires_grad  # reentrant checkpointing needs inputs that require grad


def test_gradient_checkpointing_trains_on_a_4bit_base(base_dir):
    model = peftkit.get_peft_model(prepare_model_for_kbit_training(quantized(base_dir, "nf4")),
                                   peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_bad_quantization_settings_are_named():
    config, problems = QuantizationConfig.from_dict({"bits": 3, "type": "int4", "backend": "gptq", "blocksize": 64})
    text = "\n".join(problems)
    for part in ("model.quantization.blocksize: unknown key", "bits: 3", "type: 'int4'", "backend: 'gptq'"):
        assert part in text
    _, problems = QuantizationConfig.from_dict({"bits": 8, "backend": "torchao"})
    assert problems == ["model.quantization.bits: 8 needs backend: bitsandbytes (torchao's NF4 is 4-bit)"]
    # settings the backend would not apply are refused, not dropped
    _, problems = QuantizationConfig.from_dict({"bits": 8, "compute_dtype": "fp32"})
    assert problems == ["model.quantization.compute_dtype: applies to 4-bit only (8-bit: bitsandbytes' LLM.int8 "
                        "with its own fp16 compute)"]
    _, problems = QuantizationConfig.from_dict({"bits": 4, "block_size": 128})
    assert problems and problems[0].startswith("model.quantization.block_size: 128 needs backend: torchao")
    assert QuantizationConfig.from_dict({"backend": "torchao", "block_size": 128})[1] == []


def test_an_8bit_base_prints_nothing_per_forward(base_dir, capfd):
    model = peftkit.get_peft_model(quantized(base_dir, "int8"), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    capfd.readouterr()
    for _ in range(2):
        logits(model)
    out, err = capfd.readouterr()
    assert "MatMul8bitLt" not in out + err



@pytest.mark.parametrize("kind", ["nf4", "torchao-nf4"])
def test_the_input_gradient_through_a_4bit_layer_is_the_layers_own(base_dir, kind):
    """peftkit takes a 4-bit base layer's input gradient itself (its weight dequantized in
    backward, through the fast 16-bit product); it equals the library's own backward."""
    from peftkit.methods import quantized_base

    layer = quantized(base_dir, kind).model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(4), requires_grad=True)
    layer(x).pow(2).sum().backward()
    expected, x.grad = x.grad, None
    out = quantized_base.forward(layer, x)
    assert out.grad_fn is not None and type(out.grad_fn).__name__.startswith("_DequantizingBackward")
    out.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "fp4-double"])
@pytest.mark.parametrize("rows_bytes", [512 << 10, 4096])
def test_a_training_pass_through_a_4bit_layer_computes_the_layers_own_output(base_dir, kind, rows_bytes,
                                                                             monkeypatch):
    """In training the weight is dequantized a few rows at a time in both passes (small scratch);
    the output is bit for bit the layer's own, the input gradient the layer's own to rounding."""
    from peftkit.methods import quantized_base

    monkeypatch.setattr(quantized_base, "_ROWS_BYTES", rows_bytes)  # 4096: 16 rows per step, many steps
    model = load_quantized_model(base_dir, BASES[kind][0], dtype=torch.bfloat16)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        layer = model.get_submodule(name).train()
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(4), dtype=torch.bfloat16,
                        requires_grad=True)
        expected = layer(x)
        expected.float().pow(2).sum().backward()
        expected_grad, x.grad = x.grad, None
        out = quantized_base.forward(layer, x)
        assert torch.equal(out, expected)
        with torch.no_grad():
            assert torch.equal(quantized_base.forward(layer, x), expected)  # the no-grad training pass too
        out.float().pow(2).sum().backward()
        torch.testing.assert_close(x.grad, expected_grad, rtol=0.02, atol=0.02 * expected_grad.abs().max().item())


@pytest.mark.parametrize("in_features,out_features", [(96, 300), (6146, 100), (97, 130)])
def test_rows_of_odd_shapes_align_to_whole_blocks_and_bytes(in_features, out_features, monkeypatch):
    """A row step holds whole 64-weight blocks and whole bytes whatever in_features is: the
    layer's training pass by rows still gives its own output (in fp32 to summation order: the
    product is split by output columns; a misaligned step would be off by whole weights)."""
    import bitsandbytes as bnb

    from peftkit.methods import quantized_base

    monkeypatch.setattr(quantized_base, "_ROWS_BYTES", 2048)
    g = torch.Generator().manual_seed(7)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    weight = torch.randn(out_features, in_features, generator=g)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4").to("cpu")
    layer.bias = nn.Parameter(torch.randn(out_features, generator=g), requires_grad=False)
    x = torch.randn(5, in_features, generator=g)
    layer.train()
    expected = layer(x)
    torch.testing.assert_close(quantized_base.forward(layer, x), expected, rtol=0,
                               atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("kind", ["nf4", "fp4-double", "int8"])
@pytest.mark.parametrize("shards", [1, 3])
def test_loading_reads_and_quantizes_what_transformers_does(tmp_path, kind, shards, monkeypatch):
    """`load_quantized_model` feeds transformers' quantizing load the checkpoint weight by weight
    (read, quantize, free); the model is the one transformers' own from_pretrained makes."""
    from transformers import AutoModelForCausalLM

    from peftkit.recipe.quantization import _quantization_config

    model = llama(seed=1, hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    size = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(tmp_path, max_shard_size=size // shards + 1 if shards > 1 else "5GB")
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == (shards > 1)
    from peftkit.recipe import quantization

    config = QuantizationConfig(**BASES[kind][0], compute_dtype="bf16")
    opened = []
    pread_file = quantization._pread_file
    monkeypatch.setattr(quantization, "_pread_file", lambda shard, files: opened.append(shard) or pread_file(shard, files))
    ours = load_quantized_model(str(tmp_path), config, dtype=torch.bfloat16)
    assert len(opened) == len(list(tmp_path.glob("*.safetensors")))  # our reading load ran, on every shard
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=_quantization_config(
        config, torch.bfloat16), dtype=torch.bfloat16, device_map="cpu")
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        assert ours_state[key].dtype == value.dtype and torch.equal(ours_state[key], value), key
    assert quantized_layers(ours) == quantized_layers(theirs) and len(quantized_layers(ours)) == 14
    torch.testing.assert_close(logits(ours.eval()), logits(theirs.eval()), rtol=0, atol=0)
    assert ours.name_or_path == ours.config._name_or_path == str(tmp_path)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()


def test_loading_returns_freed_buffers_to_the_system_unless_told_not_to(base_dir, monkeypatch):
    from peftkit.recipe import quantization

    calls = []
    monkeypatch.setattr(quantization, "return_freed_buffers_to_system", lambda: calls.append(1) or True)
    load_quantized_model(base_dir, {"bits": 4})
    load_quantized_model(base_dir, {"bits": 4}, return_freed_buffers=False)
    assert calls == [1]
