"""(IA)^3 specifics: per-architecture defaults, feedforward matching, config checks, merging."""
import json

import peft
import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.ia3 import IA3Config, IA3Linear
from tiny_models import FACTORIES, inputs_for, logits, perturb_trainable, twin

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_default_targets_and_feedforward_match_peft(kind, tmp_path):
    base = FACTORIES[kind]()
    spare = twin(base)
    batch = inputs_for(kind)
    reference = peft.get_peft_model(base, peft.IA3Config(task_type=TASKS[kind]))
    perturb_trainable(reference)
    reference.save_pretrained(str(tmp_path))

    ours = peftkit.get_peft_model(FACTORIES[kind](), IA3Config(task_type=TASKS[kind]))
    from safetensors.torch import load_file

    assert _shapes(ours.adapter_state_dict()) == _shapes(load_file(str(tmp_path / "adapter_model.safetensors")))
    theirs_config = reference.peft_config["default"]
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs_config.target_modules)
    assert sorted(ours.peft_config["default"].feedforward_modules) == sorted(theirs_config.feedforward_modules)

    loaded = peftkit.PeftModel.from_pretrained(spare, str(tmp_path))
    assert (logits(loaded, batch) - logits(reference, batch)).abs().max() <= 1e-5


def test_saved_config_holds_the_resolved_defaults(tmp_path):
    model = peftkit.get_peft_model(FACTORIES["llama"](), IA3Config())
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert saved["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    assert saved["feedforward_modules"] == ["down_proj"]
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    assert tuple(model.adapter_state_dict()[key].shape) == (1, 64)  # input side: [1, in]
    assert tuple(model.adapter_state_dict()[key.replace("mlp.down_proj", "self_attn.k_proj")].shape) == (16, 1)


def test_regex_targets_and_feedforward_match_peft(tmp_path):
    kwargs = dict(target_modules=r".*\.(k_proj|up_proj|down_proj)", feedforward_modules=r".*\.(up|down)_proj")
    base = FACTORIES["llama"]()
    spare = twin(base)
    reference = peft.get_peft_model(base, peft.IA3Config(**kwargs))
    perturb_trainable(reference)
    reference.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(spare, str(tmp_path))
    batch = inputs_for("llama")
    assert (logits(loaded, batch) - logits(reference, batch)).abs().max() <= 1e-5
    assert tuple(loaded.adapter_state_dict()["base_model.model.model.layers.1.mlp.up_proj.ia3_l"].shape) == (1, 32)


def test_feedforward_list_entries_match_as_plain_suffixes():
    # PEFT tests `key.endswith(name)`, without a dot: "proj" marks every *_proj as feedforward.
    model = peftkit.get_peft_model(FACTORIES["llama"](), IA3Config(
        target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    layer = model.base_model.model.model.layers[0]
    assert layer.mlp.down_proj.is_feedforward["default"] and not layer.self_attn.q_proj.is_feedforward["default"]
    model = peftkit.get_peft_model(FACTORIES["llama"](), IA3Config(target_modules=r".*_proj", feedforward_modules=["proj"]))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.is_feedforward["default"]


def test_output_scaling_is_the_plain_math():
    base = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    model = peftkit.get_peft_model(base, IA3Config(target_modules=["0", "1"], feedforward_modules=["1"]))
    l0 = torch.tensor([[0.5], [2.0], [-1.0], [3.0]])
    l1 = torch.tensor([[1.5, 0.0, 2.0, -0.5]])
    with torch.no_grad():
        model.base_model.model[0].ia3_l["default"].copy_(l0)
        model.base_model.model[1].ia3_l["default"].copy_(l1)
    x = torch.randn(5, 6)
    lin0, lin1 = model.base_model.model[0].base_layer, model.base_model.model[1].base_layer
    expected = lin1(lin0(x) * l0.flatten() * l1.flatten())
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
        before = [p.clone() for p in (lin0.weight, lin0.bias, lin1.weight, lin1.bias)]
        model.merge_adapter()
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert torch.allclose(lin0.bias, before[1] * l0.flatten())  # output scaling covers the bias
        model.unmerge_adapter()
        # Layer 0 is divided back (to rounding); layer 1's vector has a zero, so its weight was kept.
        assert torch.allclose(before[0], lin0.weight, atol=1e-7) and torch.allclose(before[1], lin0.bias, atol=1e-7)
        assert torch.equal(before[2], lin1.weight) and torch.equal(before[3], lin1.bias)


def test_safe_merge_refuses_non_finite_results():
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(4, 4)), IA3Config(target_modules=["0"], feedforward_modules=[]))
    with torch.no_grad():
        model.base_model.model[0].ia3_l["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert not model.base_model.model[0].merged


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"], init_ia3_weights="yes", task_type="LM")
    message = str(err.value)
    assert "feedforward_modules=['wo'] must be a subset of target_modules=['k', 'v']" in message
    assert "init_ia3_weights='yes'" in message and "task_type='LM'" in message


def test_unknown_architecture_needs_feedforward_modules():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="feedforward_modules is not set.*model_type=None"):
        peftkit.get_peft_model(base, IA3Config(target_modules=["0"]))
    model = peftkit.get_peft_model(base, IA3Config(target_modules=["0"], feedforward_modules=[]))
    assert tuple(model.adapter_state_dict()["base_model.model.0.ia3_l"].shape) == (4, 1)


def test_unsupported_module_is_named():
    base = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"0 \(Embedding\).*torch.nn.Linear"):
        peftkit.get_peft_model(base, IA3Config(target_modules=["0", "1"], feedforward_modules=[]))


def test_peft_config_file_loads_and_semantic_extras_are_refused(tmp_path):
    peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                   task_type="CAUSAL_LM").save_pretrained(str(tmp_path))
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, IA3Config)
    assert (sorted(config.target_modules), config.feedforward_modules) == (["down_proj", "k_proj"], ["down_proj"])
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["layers_to_transform"] = [0]
    with pytest.raises(ConfigError, match=r"does not support layers_to_transform=\[0\]"):
        PeftConfig.from_dict(data)


def test_bert_merge_scales_biases_too():
    model = peftkit.get_peft_model(FACTORIES["bert"](), IA3Config(task_type="SEQ_CLS"))
    perturb_trainable(model, scale=0.3)
    batch = inputs_for("bert")
    expected = logits(model, batch)
    assert isinstance(model.base_model.bert.encoder.layer[0].attention.self.key, IA3Linear)
    merged = model.merge_and_unload()
    assert (logits(merged, batch) - expected).abs().max() < 1e-5
