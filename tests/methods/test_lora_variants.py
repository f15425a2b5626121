"""LoRA variants against `peft` 0.21: PiSSA / OLoRA / gaussian inits, add_weighted_adapter, LoRA+;
variant objects per adapter (plain LoRA, DoRA)."""
import os

import peft
import pytest
import torch
import torch.nn as nn
from peft.optimizers import create_loraplus_optimizer

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lora.init import init_olora, init_pissa
from peftkit.methods.lora.dora import DoraVariant
from peftkit.methods.lora.layer import LoraLayer
from peftkit.methods.lora.variants import LoraVariant
from peftkit.methods.lora.plus import lora_plus_param_groups
from tiny_models import gpt2, inputs_for, llama, logits, perturb_trainable, twin

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_fc"]


def _ours(model) -> dict:
    """Parameters keyed by their path inside the base model (common to both libraries)."""
    return {k.removeprefix("base_model.model."): v for k, v in model.named_parameters()}


def _theirs(model) -> dict:
    return {k.removeprefix("base_model.model."): v for k, v in model.named_parameters()}


def _both(kind, seed=7, dtype=torch.float32, **config):
    """The same base and config through peftkit and peft, with the RNG at the same state."""
    base = (llama if kind == "llama" else gpt2)().to(dtype)
    reference_base = twin(base)
    torch.manual_seed(seed)
    ours = peftkit.get_peft_model(base, peftkit.LoraConfig(**config))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(reference_base, peft.LoraConfig(**config))
    return ours, theirs


# --- initialisations --------------------------------------------------------------------------
INIT_CASES = [("llama", init) for init in (True, "gaussian", "pissa", "pissa_niter_2", "olora")] + \
             [("gpt2", init) for init in ("gaussian", "pissa", "pissa_niter_1")]


@pytest.mark.parametrize("kind,init", INIT_CASES)
def test_init_equals_peft_and_keeps_the_output(kind, init):
    targets, fan_in_fan_out = (LLAMA_TARGETS, False) if kind == "llama" else (GPT2_TARGETS, True)
    batch = inputs_for(kind)
    plain = logits((llama if kind == "llama" else gpt2)(), batch)
    ours, theirs = _both(kind, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                         fan_in_fan_out=fan_in_fan_out)
    mine, reference = _ours(ours), _theirs(theirs)
    assert set(mine) == set(reference)
    for name, tensor in mine.items():  # A, B and the (possibly modified) base weights, bit for bit
        assert torch.equal(tensor, reference[name]), name
    assert (logits(ours, batch) - plain).abs().max() <= 1e-5
    original = _original_weights(kind)
    changed = [n for n, t in mine.items() if n in original and not torch.equal(t, original[n])]
    assert bool(changed) == (init not in (True, "gaussian"))


def _original_weights(kind, dtype=torch.float32) -> dict:
    """The untouched base weights under the adapted model's parameter names."""
    wrapped = peftkit.get_peft_model((llama if kind == "llama" else gpt2)().to(dtype), peftkit.LoraConfig(
        r=4, target_modules=LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS, init_lora_weights=False))
    return {n: p for n, p in _ours(wrapped).items() if "lora_" not in n}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_base_is_decomposed_in_fp32_and_cast_back_like_peft(init):
    ours, theirs = _both("llama", dtype=torch.bfloat16, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                         init_lora_weights=init)
    mine, reference = _ours(ours), _theirs(theirs)
    original = _original_weights("llama", torch.bfloat16)
    for name, tensor in mine.items():
        if "lora_" in name:
            # peft rounds the fresh factors to the base dtype before upcasting them; ours stay fp32.
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor.to(torch.bfloat16).float(), reference[name]), name
        else:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name]), name
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    rebuilt = layer.base_layer.weight.float() + layer.get_delta_weight("default")
    before = original["model.layers.0.mlp.down_proj.base_layer.weight"].float()
    assert (rebuilt - before).abs().max() <= 2 * before.abs().max() * 2 ** -8  # bf16 rounding of the residual


def test_olora_on_conv1d_decomposes_the_out_in_matrix():
    # peft 0.21 fails on this case (it QR-decomposes Conv1D's [in, out] weight without transposing).
    base = gpt2()
    batch = inputs_for("gpt2")
    plain = logits(base, batch)
    before = base.transformer.h[0].attn.c_attn.weight.detach().clone()
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS,
                                                            init_lora_weights="olora", fan_in_fan_out=True))
    layer = model.base_model.transformer.h[0].attn.c_attn
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, 32) and B.shape == (96, 4)
    assert torch.allclose(B.T @ B, torch.eye(4), atol=1e-5)  # B = orthonormal Q columns
    assert torch.allclose(layer.base_layer.weight + layer.get_delta_weight("default"), before, atol=1e-6)
    assert (logits(model, batch) - plain).abs().max() <= 1e-5


def test_pure_init_functions_split_off_the_principal_part():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=g)
    S = torch.linalg.svdvals(weight)
    for niter in (None, 4):
        A, B, residual = init_pissa(weight, r=6, scaling=2.0, niter=niter)
        assert A.shape == (6, 40) and B.shape == (24, 6)
        assert torch.allclose(residual + 2.0 * B @ A, weight, atol=1e-5)
        assert torch.linalg.matrix_rank(B @ A) == 6
        tail = torch.linalg.svdvals(residual)[:18]
        tolerance = 1e-4 if niter is None else 0.5  # randomized SVD is approximate
        assert torch.allclose(tail, S[6:], atol=tolerance)
    A, B, residual = init_olora(weight.T.contiguous(), r=5, scaling=0.5, fan_in_fan_out=True)
    assert A.shape == (5, 40) and B.shape == (24, 5) and residual.shape == (40, 24)
    assert torch.allclose(residual.T + 0.5 * B @ A, weight, atol=1e-5)
    with pytest.raises(ValueError, match=r"r <= min\(out_features, in_features\) = 24 .*got r=30"):
        init_pissa(weight, r=30, scaling=1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 base weight, got torch.int8"):
        init_olora(weight.to(torch.int8), r=2, scaling=1.0)


def test_bad_init_names_and_unsupported_layers_are_refused():
    with pytest.raises(ConfigError) as err:
        peftkit.LoraConfig(r=0, init_lora_weights="pissa_niter_x")
    assert "r=0" in str(err.value) and "init_lora_weights='pissa_niter_x' is not supported" in str(err.value)
    assert "'pissa_niter_[N]'" in str(err.value)
    assert peftkit.LoraConfig(init_lora_weights="OLoRA").init_lora_weights == "OLoRA"  # peft is case-insensitive here
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is supported for Linear and Conv1D.*not nn.Conv2d"):
        peftkit.get_peft_model(conv, peftkit.LoraConfig(target_modules=["0"], init_lora_weights="pissa"))


def test_saved_pissa_adapter_reloads_like_peft(tmp_path):
    """Loading re-runs the decomposition on the base it is given, in peft and in peftkit."""
    batch = inputs_for("llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = peftkit.get_peft_model(llama(), peftkit.LoraConfig(**config))
    perturb_trainable(model)
    trained = logits(model, batch)
    model.save_pretrained(str(tmp_path))
    residual = twin(model).unload()  # the base that training used

    # onto the ORIGINAL base: both libraries rebuild the residual and reproduce training exactly
    for loaded in (peft.PeftModel.from_pretrained(llama(), str(tmp_path)),
                   peftkit.PeftModel.from_pretrained(llama(), str(tmp_path))):
        assert (logits(loaded, batch) - trained).abs().max() <= 1e-5
    # onto the residual base: both subtract the principal part a second time, identically
    in_peft = logits(peft.PeftModel.from_pretrained(twin(residual), str(tmp_path)), batch)
    in_peftkit = logits(peftkit.PeftModel.from_pretrained(twin(residual), str(tmp_path)), batch)
    assert (in_peftkit - in_peft).abs().max() <= 1e-5
    assert (in_peftkit - trained).abs().max() > 1e-3
    # the documented fix for shipping the residual base: mark the saved adapter as plain LoRA
    config_path = os.path.join(str(tmp_path), "adapter_config.json")
    text = open(config_path).read().replace('"init_lora_weights": "pissa"', '"init_lora_weights": true')
    open(config_path, "w").write(text)
    for cls in (peft.PeftModel, peftkit.PeftModel):
        assert (logits(cls.from_pretrained(twin(residual), str(tmp_path)), batch) - trained).abs().max() <= 1e-5


def test_peft_olora_adapter_loads_in_peftkit(tmp_path):
    batch = inputs_for("llama")
    reference = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                             init_lora_weights="olora"))
    perturb_trainable(reference)
    expected = logits(reference, batch)
    reference.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(llama(), str(tmp_path))
    assert (logits(loaded, batch) - expected).abs().max() <= 1e-5


# --- add_weighted_adapter ---------------------------------------------------------------------
class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.point = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.point(self.conv(x)).flatten(1))


def _two_adapters(kind, first, second, tmp_path):
    """Two perturbed adapters in peftkit and the same two loaded into peft."""
    factory = {"llama": llama, "gpt2": gpt2, "conv": TinyConvNet}[kind]
    model = peftkit.get_peft_model(factory(), peftkit.LoraConfig(**first))
    perturb_trainable(model, seed=3)
    model.add_adapter("other", peftkit.LoraConfig(**second))
    model.set_adapter("other")
    perturb_trainable(model, seed=4)
    model.set_adapter("default")
    model.save_pretrained(str(tmp_path))
    reference = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    reference.load_adapter(os.path.join(str(tmp_path), "other"), adapter_name="other")
    return model, reference


WEIGHTED_CASES = {
    "linear": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
               dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"]), dict(combination_type="linear")),
    "cat": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
            dict(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]), dict(combination_type="cat")),
    "svd": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
            dict(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]), dict(combination_type="svd")),
    "svd-rank-clamp": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"]),
                       dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
                       dict(combination_type="svd", svd_rank=3, svd_clamp=0.9)),
    "ties": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"]), dict(r=4, target_modules=["q_proj"]),
             dict(combination_type="ties", density=0.5)),
    "magnitude_prune_svd": ("llama", dict(r=4, target_modules=["q_proj"]), dict(r=2, target_modules=["q_proj"]),
                            dict(combination_type="magnitude_prune_svd", density=0.3)),
    "gpt2-svd": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                 dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                 dict(combination_type="svd")),
    "gpt2-cat": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                 dict(r=2, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                 dict(combination_type="cat")),
    "conv-svd": ("conv", dict(r=2, lora_alpha=4, target_modules=["conv", "point"]),
                 dict(r=3, lora_alpha=3, target_modules=["conv", "point"]), dict(combination_type="svd")),
    "conv-cat": ("conv", dict(r=2, lora_alpha=4, target_modules=["conv", "point"]),
                 dict(r=3, lora_alpha=3, target_modules=["conv"]), dict(combination_type="cat")),
}


@pytest.mark.parametrize("case", sorted(WEIGHTED_CASES))
def test_add_weighted_adapter_equals_peft(case, tmp_path):
    kind, first, second, options = WEIGHTED_CASES[case]
    model, reference = _two_adapters(kind, first, second, tmp_path)
    weights = [0.7, -1.3]
    model.add_weighted_adapter(["default", "other"], weights, "mix", **options)
    reference.add_weighted_adapter(["default", "other"], weights, "mix", **options)

    ours, theirs = model.peft_config["mix"], reference.peft_config["mix"]
    assert (ours.r, ours.lora_alpha) == (theirs.r, theirs.lora_alpha)
    assert set(ours.target_modules) == set(theirs.target_modules)
    layers = {p: m for p, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer) and "mix" in m.adapter_names}
    assert layers and set(layers) == {p for p, m in reference.base_model.model.named_modules()
                                      if hasattr(m, "lora_A") and "mix" in m.scaling}
    for path, layer in layers.items():
        expected = reference.base_model.model.get_submodule(path).get_delta_weight("mix")
        assert (layer.get_delta_weight("mix") - expected).abs().max() <= 1e-5, path
        assert layer.get_delta_weight("mix").abs().max() > 1e-3
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".mix" in n)
    if kind != "conv":
        model.set_adapter("mix")
        reference.set_adapter("mix")
        batch = inputs_for(kind)
        assert (logits(model, batch) - logits(reference, batch)).abs().max() <= 1e-5


def test_dare_uses_the_global_rng_like_peft(tmp_path):
    model, reference = _two_adapters("llama", dict(r=4, target_modules=["q_proj"]),
                                     dict(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    options = dict(combination_type="dare_ties", density=0.6)
    torch.manual_seed(11)
    model.add_weighted_adapter(["default", "other"], [1.0, 0.5], "mix", **options)
    torch.manual_seed(11)
    reference.add_weighted_adapter(["default", "other"], [1.0, 0.5], "mix", **options)
    for path, layer in model.get_base_model().named_modules():
        if isinstance(layer, LoraLayer) and "mix" in layer.adapter_names:
            expected = reference.base_model.model.get_submodule(path).get_delta_weight("mix")
            assert torch.allclose(layer.get_delta_weight("mix"), expected, atol=1e-6), path


def test_svd_combination_is_exact_with_enough_rank_even_for_rslora(tmp_path):
    # peft copies use_rslora to the combined adapter (scaling sqrt(r) instead of 1); peftkit does not.
    model, _ = _two_adapters("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
                             dict(r=2, lora_alpha=2, target_modules=["q_proj"], use_rslora=True), tmp_path)
    model.add_weighted_adapter(["default", "other"], [0.5, 2.0], "mix", combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(["default", "other"], [0.5, 2.0], "joined", combination_type="cat")
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    expected = 0.5 * layer.get_delta_weight("default") + 2.0 * layer.get_delta_weight("other")
    assert (layer.get_delta_weight("mix") - expected).abs().max() <= 1e-5
    assert (layer.get_delta_weight("joined") - expected).abs().max() <= 1e-5
    assert model.peft_config["mix"].use_rslora is False and layer.scaling["mix"] == 1.0


def test_add_weighted_adapter_reports_every_bad_argument(tmp_path):
    model, _ = _two_adapters("llama", dict(r=4, target_modules=["q_proj"]), dict(r=2, target_modules=["q_proj"]),
                             tmp_path)
    with pytest.raises(ValueError) as err:
        model.add_weighted_adapter(["default", "nope"], [1.0], "default", combination_type="mean")
    message = str(err.value)
    assert "adapters ['nope'] do not exist; available adapters: ['default', 'other']" in message
    assert "weights=[1.0] must be a list of 2 numbers" in message
    assert "adapter_name='default' already exists" in message
    assert "combination_type='mean' is not one of ['cat', 'linear'" in message
    with pytest.raises(ValueError, match=r"combination_type='linear' needs equal ranks, got \{'default': 4, 'other': 2\}"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(ValueError, match=r"density=None must be a number in \(0, 1\] for combination_type='ties_svd'"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="ties_svd")
    with pytest.raises(ValueError, match=r"svd_rank=40 exceeds the rank limit 32 of module 'model.layers.0.self_attn.q_proj'"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", svd_rank=40)
    assert list(model.peft_config) == ["default", "other"]  # a failed combination leaves nothing behind


# --- LoRA+ ----------------------------------------------------------------------------------------
def _groups_by_setting(groups, names) -> dict:
    return {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups if g["params"]}


@pytest.mark.parametrize("kind,config", [
    ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True,
                  modules_to_save=["ln_f"])),
    ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
])
def test_lora_plus_groups_equal_peft(kind, config):
    ours, theirs = _both(kind, **config)
    groups = lora_plus_param_groups(ours, lr=1e-3, ratio=8.0, weight_decay=0.1, embedding_lr=5e-5)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0,
                                          loraplus_weight_decay=0.1, loraplus_lr_embedding=5e-5)
    mine = {id(p): n for n, p in _ours(ours).items()}
    reference = {id(p): n for n, p in _theirs(theirs).items()}  # DoRA's m included: same names as peft
    expected = _groups_by_setting(optimizer.param_groups, reference)
    got = _groups_by_setting(groups, mine)
    assert got == expected
    assert len(got[(8e-3, 0.1)]) > 0 and len(got[(1e-3, 0.1)]) > 0


def test_lora_plus_moves_B_ratio_times_faster():
    model = peftkit.get_peft_model(llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)  # B = 0 would leave A without gradient
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora_plus_param_groups(model, lr=1e-3, ratio=16.0), weight_decay=0.0)
    batch = inputs_for("llama")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    steps = {"lora_A": [], "lora_B": []}
    for name, param in model.named_parameters():
        if name in before:
            steps["lora_A" if ".lora_A." in name else "lora_B"].append((param - before[name]).abs().max().item())
    # Adam's first step moves every entry by about lr (sign of the gradient)
    assert max(steps["lora_A"]) == pytest.approx(1e-3, rel=1e-3)
    assert max(steps["lora_B"]) == pytest.approx(16e-3, rel=1e-3)


def test_lora_plus_validates_its_numbers():
    model = peftkit.get_peft_model(llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"lr=-1 must be a non-negative number; ratio='x' must be"):
        lora_plus_param_groups(model, lr=-1, ratio="x")


# --- variant objects ------------------------------------------------------------------------------
def test_each_adapter_holds_its_variant_and_dora_keeps_peft_names(tmp_path):
    """A DoRA and a plain adapter on one layer: each has its own variant object; DoRA's m is a
    module's `.weight` in the tree (peft's name) but saved as `lora_magnitude_vector` (peft's file);
    deleting an adapter drops its variant, and merging/unmerging both restores the base."""
    model = peftkit.get_peft_model(llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.add_adapter("plain", peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.lora_variant["default"]) is DoraVariant and type(layer.lora_variant["plain"]) is LoraVariant
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in \
        dict(model.named_parameters())
    assert set(layer.adapter_state("default")) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    perturb_trainable(model)
    base = layer.base_layer.weight.detach().clone()
    layer.set_adapter(["default", "plain"])
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, base)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base, rtol=0, atol=1e-6)
    model.delete_adapter("default")
    assert list(layer.lora_variant) == ["plain"] and "default" not in layer.lora_magnitude_vector
