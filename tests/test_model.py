"""PeftModel behaviour: merge, disable, unload, gradients, several adapters, errors."""
import json

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from tiny_models import bert_cls, gpt2, inputs_for, llama, logits, perturb_trainable


def _adapted(kind="llama", **kwargs):
    base = {"llama": llama, "gpt2": gpt2, "bert": bert_cls}[kind]()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear")
    config.update(kwargs)
    model = get_peft_model(base, LoraConfig(**config))
    perturb_trainable(model)
    return model


def test_new_adapter_leaves_output_unchanged():
    base = llama()
    batch = inputs_for("llama")
    before = logits(base, batch)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", use_dora=True))
    assert torch.equal(logits(model, batch), before)


@pytest.mark.parametrize("kind,kwargs", [("llama", {}), ("llama", {"use_dora": True}), ("gpt2", {"target_modules": ["c_attn", "c_fc"]}),
                                         ("llama", {"target_modules": ["embed_tokens", "q_proj"]})])
def test_merge_unmerge_and_merge_and_unload(kind, kwargs):
    model = _adapted(kind, **kwargs)
    batch = inputs_for(kind)
    unmerged = logits(model, batch)
    with model.disable_adapter():
        base_out = logits(model, batch)
    model.merge_adapter()
    assert (logits(model, batch) - unmerged).abs().max() < 1e-5
    with model.disable_adapter():  # disabling a merged adapter unmerges it
        assert (logits(model, batch) - base_out).abs().max() < 1e-5
    model.merge_adapter()
    model.unmerge_adapter()
    assert (logits(model, batch) - unmerged).abs().max() < 1e-5
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.base.AdapterLayer) for m in merged.modules())
    assert type(merged).__name__ in ("LlamaForCausalLM", "GPT2LMHeadModel")
    assert (logits(merged, batch) - unmerged).abs().max() < 1e-5


def test_disable_adapter_gives_exactly_the_base_output_and_unload_restores_modules():
    base = llama()
    original_types = {n: type(m) for n, m in base.named_modules()}
    batch = inputs_for("llama")
    expected = logits(base, batch)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    perturb_trainable(model)
    assert (logits(model, batch) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), expected)
    restored = model.unload()
    assert {n: type(m) for n, m in restored.named_modules()} == original_types
    assert torch.equal(logits(restored, batch), expected)


def test_only_adapter_parameters_get_gradients():
    model = _adapted("llama", modules_to_save=["lm_head"], target_modules=["q_proj", "v_proj"])
    model.train()
    batch = inputs_for("llama")
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2 + 1  # 2 layers x 2 modules x (A, B) + lm_head copy


def test_trainable_counts_and_print(capsys):
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (4 * 32 + 32 * 4)
    assert total == sum(p.numel() for p in llama().parameters()) + trainable
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


def test_seq_cls_keeps_the_head_trainable_and_saved(tmp_path):
    model = get_peft_model(bert_cls(), LoraConfig(r=4, task_type="SEQ_CLS"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in names
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_and_save_biases(bias, tmp_path):
    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    trainable_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    if bias == "all":
        assert len(trainable_biases) == sum(1 for n, _ in gpt2().named_parameters() if n.endswith("bias"))
    else:
        assert sorted(trainable_biases) == [f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)]
    perturb_trainable(model)
    batch = inputs_for("gpt2")
    expected = logits(model, batch)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(gpt2(), str(tmp_path))
    assert (logits(loaded, batch) - expected).abs().max() < 1e-6


def test_gradient_checkpointing_with_adapters():
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for kwargs in ({"use_reentrant": True}, None):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        batch = inputs_for("llama")
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)


def test_generate_works_through_the_wrapper():
    model = _adapted("llama", target_modules=["q_proj"])
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_multiple_adapters_add_switch_delete_save_load(tmp_path):
    base = llama()
    batch = inputs_for("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj", "q_proj"]))
    assert model.active_adapter == "first"
    assert all("first" in n for n, p in model.named_parameters() if p.requires_grad)
    perturb_trainable(model, seed=1)
    out_first = logits(model, batch)
    model.set_adapter("second")
    assert all(".second" in n for n, p in model.named_parameters() if p.requires_grad)
    perturb_trainable(model, seed=2)
    out_second = logits(model, batch)
    assert (out_first - out_second).abs().max() > 1e-3

    model.save_pretrained(str(tmp_path), selected_adapters=["second"])
    assert (tmp_path / "second" / "adapter_config.json").exists() and not (tmp_path / "adapter_config.json").exists()
    model.save_pretrained(str(tmp_path / "all"))
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["first", "second"]

    fresh = PeftModel.from_pretrained(llama(), str(tmp_path / "all" / "first"), adapter_name="first")
    report = fresh.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert (logits(fresh, batch) - out_first).abs().max() < 1e-6
    fresh.set_adapter("second")
    assert (logits(fresh, batch) - out_second).abs().max() < 1e-6

    fresh.delete_adapter("second")
    assert list(fresh.peft_config) == ["first"] and fresh.active_adapter == "first"
    assert type(fresh.base_model.model.model.layers[0].self_attn.v_proj) is nn.Linear  # no adapter left there
    assert (logits(fresh, batch) - out_first).abs().max() < 1e-6
    assert not any(".second" in n for n, _ in fresh.named_parameters())


def test_from_pretrained_inference_mode_and_trainable(tmp_path):
    model = _adapted("llama", target_modules=["q_proj"])
    model.save_pretrained(str(tmp_path))
    frozen = PeftModel.from_pretrained(llama(), str(tmp_path))
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(llama(), str(tmp_path), is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 4


# --- errors -------------------------------------------------------------------------------------

def test_unmatched_targets_name_the_targets_and_list_module_names():
    with pytest.raises(ValueError) as err:
        get_peft_model(llama(), LoraConfig(target_modules=["qkv"]))
    message = str(err.value)
    assert "['qkv']" in message and "q_proj" in message and "down_proj" in message


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(LlamaMLP\).*Supported module types"):
        get_peft_model(llama(), LoraConfig(target_modules=["mlp"]))


def test_unknown_architecture_without_targets_lists_candidates():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

    with pytest.raises(ValueError, match=r"no default for model_type=None.*\['encoder', 'head'\]"):
        get_peft_model(Net(), LoraConfig())


def test_plain_pytorch_model_with_explicit_targets():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = net(x)
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"]))
    assert torch.equal(model(x), expected)


def test_invalid_config_values_are_all_reported():
    with pytest.raises(ValueError) as err:
        LoraConfig(r=0, lora_dropout=1.5, bias="some", init_lora_weights="magic", task_type="CHAT")
    message = str(err.value)
    for fragment in ("r=0", "lora_dropout=1.5", "bias='some'", "init_lora_weights='magic'", "task_type='CHAT'"):
        assert fragment in message


def test_missing_config_and_corrupt_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        PeftModel.from_pretrained(llama(), str(tmp_path))
    model = _adapted("llama", target_modules=["q_proj"])
    model.save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(llama(), str(tmp_path))


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    _adapted("llama", r=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: the model expects \(2, 32\) but the adapter file has \(4, 32\)"):
        PeftModel.from_pretrained(llama(), str(tmp_path))


def test_missing_and_unexpected_keys_are_reported_by_name(tmp_path):
    model = _adapted("llama", target_modules=["q_proj"])
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    state.pop(dropped)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = llama()
    with pytest.warns(UserWarning) as record:
        PeftModel.from_pretrained(base, str(tmp_path))
    text = " ".join(str(r.message) for r in record)
    assert dropped in text and "lora_C.weight" in text
    fresh = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    report = fresh.load_adapter(str(tmp_path), adapter_name="other")
    assert report.missing_keys == [dropped]
    assert report.unexpected_keys == ["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"]


def test_unsupported_peft_fields_are_refused(tmp_path):
    _adapted("llama", target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update({"lora_bias": True, "peft_version": "0.21.2", "megatron_core": "megatron.core"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not support lora_bias=True"):
        PeftModel.from_pretrained(llama(), str(tmp_path))


def test_adapter_management_errors():
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"Adapter 'nope' not found; available adapters: \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match=r"selected_adapters \['x'\] do not exist"):
        model.save_pretrained("/tmp/never", selected_adapters=["x"])
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))


def test_wrapped_modules_still_expose_weight_and_follow_eval_mode():
    from tiny_models import t5

    model = get_peft_model(t5(), LoraConfig(r=2, target_modules=["wo"], lora_dropout=0.5))
    batch = inputs_for("t5")
    perturb_trainable(model)
    first, second = logits(model, batch), logits(model, batch)  # T5 reads wo.weight.dtype
    assert torch.equal(first, second)  # the base was in eval mode, so dropout stays off
    model.train()
    assert not torch.equal(model(**batch).logits, model(**batch).logits)


def test_adapters_on_a_meta_device_model_count_parameters_without_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    real = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert model.get_nb_trainable_parameters() == real.get_nb_trainable_parameters()
    assert all(p.device.type == "meta" for p in model.parameters())


def test_disable_adapter_is_exact_in_bf16_training_with_fast_attention_and_labels():
    # A DPO-style reference pass: train mode, bf16, the attention kernel enabled, labels given.
    from peftkit import enable_fast_attention
    from peftkit.fast_attention import fast_attention_enabled

    base = llama().to(torch.bfloat16).train()
    batch = inputs_for("llama")
    expected = base(**batch, labels=batch["input_ids"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).train()
    perturb_trainable(model)
    assert enable_fast_attention(model) > 0
    with model.disable_adapter():
        assert not fast_attention_enabled(model.get_base_model())
        out = model(**batch, labels=batch["input_ids"])
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert fast_attention_enabled(model.get_base_model())
    assert model(**batch, labels=batch["input_ids"]).logits is None  # the chunked loss again
