"""LoHa and LoKr specifics, against `peft`: factorisation, parameter layouts for every variant,
Conv2d (plain and CP), dropout in training, gradients, init modes and config handling."""
import json

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors.torch import load_file

import peftkit
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.loha import LoHaConfig, LoHaLinear
from peftkit.methods.lokr import LoKrConfig, factorization
from tiny_models import gpt2, inputs_for, llama, logits, perturb_trainable, twin

CLASSES = {"LOHA": (LoHaConfig, peft.LoHaConfig), "LOKR": (LoKrConfig, peft.LoKrConfig)}


class ConvNet(nn.Module):
    """Convolutions with padding, stride, groups and a 1x1 kernel, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
        self.pw = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(self.pw(x).mean(dim=(2, 3)))


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _peft_to_peftkit(method, kwargs, make_model, run, tmp_path):
    """Train-free round trip: a perturbed peft adapter loaded into peftkit. Returns both models."""
    ours_cls, theirs_cls = CLASSES[method]
    base = make_model()
    spare = twin(base)
    reference = peft.get_peft_model(base, theirs_cls(**kwargs)).eval()  # peft's new layers start in train mode
    perturb_trainable(reference, scale=0.2)
    reference.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(spare, str(tmp_path))
    fresh = peftkit.get_peft_model(make_model(), ours_cls(**kwargs))
    assert _shapes(fresh.adapter_state_dict()) == _shapes(load_file(str(tmp_path / "adapter_model.safetensors")))
    with torch.no_grad():
        theirs, ours = run(reference), run(loaded)
        with reference.disable_adapter():
            plain = run(reference)
    assert (theirs - plain).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5
    return reference, loaded


def _llama_run(model):
    return model(**inputs_for("llama")).logits


def test_factorization_matches_peft():
    for dimension in [*range(1, 300), 1024, 4096, 11008, 14336]:
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


LLAMA_VARIANTS = [
    ("LOKR", dict(r=8, alpha=16, target_modules="all-linear")),  # full w1 and w2
    ("LOKR", dict(r=2, alpha=4, target_modules="all-linear", decompose_both=True)),
    ("LOKR", dict(r=4, target_modules=["q_proj", "down_proj"], decompose_factor=8, rank_pattern={"down_proj": 1},
                  alpha_pattern={"q_proj": 3})),
    ("LOKR", dict(r=4, target_modules=["q_proj", "k_proj"], init_weights="lycoris", exclude_modules=["k_proj"])),
    ("LOKR", dict(r=3, target_modules=["o_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("LOHA", dict(r=2, alpha=4, target_modules=["gate_proj", "q_proj"], rank_pattern={"gate_proj": 6})),
    ("LOHA", dict(r=4, target_modules=r".*\.(k|o)_proj", alpha_pattern={"k_proj": 2}, init_weights=False)),
    ("LOHA", dict(r=3, target_modules=["v_proj", "down_proj"], layers_to_transform=0, modules_to_save=["lm_head"])),
]


@pytest.mark.parametrize("method,kwargs", LLAMA_VARIANTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(LLAMA_VARIANTS)])
def test_llama_variants_load_from_peft_with_same_layout_and_logits(method, kwargs, tmp_path):
    _peft_to_peftkit(method, kwargs, llama, _llama_run, tmp_path)


CONV_VARIANTS = [
    ("LOHA", dict(r=2, target_modules=["conv1", "conv2", "pw", "head"])),
    ("LOHA", dict(r=2, alpha=3, target_modules=["conv1", "conv2", "pw"], use_effective_conv2d=True)),
    ("LOKR", dict(r=4, target_modules=["conv1", "conv2", "pw", "head"])),
    ("LOKR", dict(r=1, target_modules=["conv1", "conv2", "pw"], decompose_both=True)),
    ("LOKR", dict(r=1, alpha=2, target_modules=["conv1", "conv2", "pw"], use_effective_conv2d=True)),
]


@pytest.mark.parametrize("method,kwargs", CONV_VARIANTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONV_VARIANTS)])
def test_conv2d_variants_match_peft_and_merge(method, kwargs, tmp_path):
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    _, loaded = _peft_to_peftkit(method, kwargs, ConvNet, lambda m: m(x), tmp_path)
    with torch.no_grad():
        expected = loaded(x)
        loaded.merge_adapter()
        assert (loaded(x) - expected).abs().max() < 1e-5
        loaded.unmerge_adapter()
        assert (loaded(x) - expected).abs().max() < 1e-5
    if kwargs.get("use_effective_conv2d"):
        keys = loaded.adapter_state_dict()
        assert any(k.endswith(("hada_t1", "lokr_t2")) for k in keys)
        assert not any(k.startswith("base_model.model.pw.") and k.endswith(("t1", "t2")) for k in keys)  # 1x1


@pytest.mark.parametrize("method,kwargs", [
    ("LOHA", dict(r=4, alpha=8, target_modules="all-linear", rank_dropout=0.5, module_dropout=0.3)),
    ("LOKR", dict(r=2, alpha=8, target_modules="all-linear", rank_dropout=0.5, module_dropout=0.3,
                  rank_dropout_scale=True)),
    ("LOKR", dict(r=2, alpha=8, target_modules=["q_proj", "up_proj"], rank_dropout=0.4)),
])
def test_training_mode_dropout_matches_peft_for_the_same_seed(method, kwargs, tmp_path):
    reference, loaded = _peft_to_peftkit(method, kwargs, lambda: llama(attention_dropout=0.0), _llama_run, tmp_path)
    reference.train(), loaded.train()
    eval_out = _llama_run(loaded.eval())
    loaded.train()
    outputs = []
    for seed in range(3):
        torch.manual_seed(seed)
        theirs = _llama_run(reference)
        torch.manual_seed(seed)
        ours = _llama_run(loaded)
        assert (ours - theirs).abs().max() <= 1e-5
        outputs.append(ours)
    assert (outputs[0] - eval_out).abs().max() > 1e-4  # the dropout did something


@pytest.mark.parametrize("method,kwargs", [
    ("LOHA", dict(r=4, alpha=8, target_modules="all-linear")),  # both LoHa linear paths (r^2 vs dims)
    ("LOKR", dict(r=2, alpha=4, target_modules="all-linear", decompose_both=True)),
])
def test_gradients_match_peft(method, kwargs, tmp_path):
    reference, loaded = _peft_to_peftkit(method, kwargs, llama, _llama_run, tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(llama(), str(tmp_path), is_trainable=True)
    batch = inputs_for("llama")
    for model in (reference, loaded):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in loaded.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    for name, grad in ours.items():
        assert torch.allclose(grad, theirs[name], atol=1e-6, rtol=1e-4), name


def test_loha_linear_fast_path_equals_the_materialised_delta():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48)
    for r, fast in ((2, True), (8, False)):  # r^2 * (in + out) vs in * out decides the path
        layer = LoHaLinear(nn.Linear(48, 40))
        layer.update_layer("a", r=r, alpha=3.0, init_weights=False)
        layer.set_adapter("a")
        assert (r * r * (48 + 40) < 48 * 40) is fast
        with torch.no_grad():
            expected = layer.base_layer(x) + F.linear(x, layer.get_delta_weight("a"))
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_init_modes():
    def state(config):
        return peftkit.get_peft_model(llama(), config).adapter_state_dict()

    key = "base_model.model.model.layers.0.self_attn.q_proj."
    loha = state(LoHaConfig(r=4, target_modules=["q_proj"]))
    assert not loha[key + "hada_w2_b"].any() and loha[key + "hada_w1_b"].any()
    lokr = state(LoKrConfig(r=4, target_modules=["q_proj"]))
    assert not lokr[key + "lokr_w1"].any() and lokr[key + "lokr_w2"].any()
    lycoris = state(LoKrConfig(r=4, target_modules=["q_proj"], init_weights="lycoris"))
    assert lycoris[key + "lokr_w1"].any() and not lycoris[key + "lokr_w2"].any()
    batch = inputs_for("llama")
    plain = logits(llama(), batch)
    for config in (LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False),
                   LoKrConfig(r=4, target_modules=["q_proj"], init_weights=False)):
        assert (logits(peftkit.get_peft_model(llama(), config), batch) - plain).abs().max() > 1e-4


def test_module_dropout_one_skips_the_adapter_only_while_training():
    model = peftkit.get_peft_model(llama(attention_dropout=0.0), LoKrConfig(
        r=4, target_modules=["q_proj", "v_proj"], module_dropout=1.0, init_weights=False))
    batch = inputs_for("llama")
    with model.disable_adapter():
        plain = logits(model, batch)
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.training  # follows the eval-mode model
    assert (logits(model, batch) - plain).abs().max() > 1e-4
    assert torch.equal(logits(model.train(), batch), plain)


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_peft_config_files_load_and_semantic_extras_are_refused(method, tmp_path):
    ours_cls, theirs_cls = CLASSES[method]
    theirs_cls(r=6, alpha=12, target_modules=["q_proj"], rank_dropout=0.1, module_dropout=0.2,
               use_effective_conv2d=True, rank_pattern={"q": 2}, alpha_pattern={"q": 3}, layers_to_transform=[1],
               task_type="CAUSAL_LM").save_pretrained(str(tmp_path))
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert type(config) is ours_cls
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value in data.items():
        if field not in ("peft_version", "revision", "auto_mapping", "peft_type"):
            assert getattr(config, field) == value, field
    assert json.loads(config.to_json_string()).keys() <= data.keys()
    data["use_dora"] = True
    with pytest.raises(ConfigError, match="does not support use_dora=True"):
        PeftConfig.from_dict(data)


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        LoKrConfig(r=0, alpha="x", rank_dropout=1.5, decompose_factor=0, init_weights="gaussian",
                   rank_pattern={"q": -1}, layers_pattern="layers")
    message = str(err.value)
    for fragment in ("r=0", "alpha='x'", "rank_dropout=1.5", "decompose_factor=0", "init_weights='gaussian'",
                     "rank_pattern values", "layers_pattern='layers' needs layers_to_transform"):
        assert fragment in message, fragment
    with pytest.raises(ConfigError, match="init_weights='lycoris' is not one of \\[True, False\\]"):
        LoHaConfig(init_weights="lycoris")


def test_unsupported_modules_are_refused_clearly():
    with pytest.raises(ValueError, match=r"c_attn \(Conv1D\).*Supported module types: \['torch.nn.Linear'"):
        peftkit.get_peft_model(gpt2(), LoHaConfig(target_modules=["c_attn"]))
    net = ConvNet()
    net.conv1.padding_mode = "reflect"
    with pytest.raises(ValueError, match="conv1 is an nn.Conv2d with padding_mode='reflect'"):
        peftkit.get_peft_model(net, LoKrConfig(target_modules=["conv1"]))


def test_default_targets_follow_lora_table():
    model = peftkit.get_peft_model(llama(), LoKrConfig())
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    reference = peft.get_peft_model(llama(), peft.LoKrConfig())
    assert sorted(reference.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_several_adapters_switch_save_load_and_delete(tmp_path):
    batch = inputs_for("llama")
    model = peftkit.get_peft_model(llama(), LoKrConfig(r=2, target_modules=["q_proj"], init_weights=False),
                                   adapter_name="first")
    model.add_adapter("second", LoKrConfig(r=1, target_modules=["q_proj", "up_proj"], decompose_both=True,
                                           init_weights=False))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.adapter_names == ["first", "second"]
    assert "second" in q_proj.lokr_w1_a and "second" not in q_proj.lokr_w1  # layouts differ per adapter
    out_first = logits(model, batch)
    model.set_adapter("second")
    out_second = logits(model, batch)
    assert (out_first - out_second).abs().max() > 1e-4
    model.save_pretrained(str(tmp_path))

    fresh = peftkit.PeftModel.from_pretrained(llama(), str(tmp_path / "first"), adapter_name="first")
    report = fresh.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert (logits(fresh, batch) - out_first).abs().max() < 1e-6
    fresh.set_adapter("second")
    assert (logits(fresh, batch) - out_second).abs().max() < 1e-6
    fresh.delete_adapter("second")
    assert type(fresh.base_model.model.model.layers[0].mlp.up_proj) is nn.Linear
    assert fresh.base_model.model.model.layers[0].self_attn.q_proj.adapter_names == ["first"]
    assert (logits(fresh, batch) - out_first).abs().max() < 1e-6
