"""Hotswap (`peftkit.hotswap_adapter`): a loaded adapter's weights replaced in place by another
saved adapter's; under torch.compile nothing recompiles and the outputs are the new adapter's."""
import pytest
import torch
import torch._dynamo

import peftkit
from tiny_models import llama as tiny_llama, perturb_trainable

def llama():
    return tiny_llama(num_hidden_layers=1)  # one decoder layer: torch.compile traces it in a few seconds


IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _save(folder, seed, **kwargs):
    model = peftkit.get_peft_model(llama(), peftkit.LoraConfig(**kwargs))
    perturb_trainable(model, seed=seed, scale=0.3)
    model.save_pretrained(str(folder))
    return str(folder)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    return {
        "a": _save(root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        # higher rank, other alpha, a subset of a's modules
        "b": _save(root / "b", 2, r=8, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]),
        "c": _save(root / "c", 3, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
        "d": _save(root / "d", 5, r=2, lora_alpha=16, target_modules=["q_proj", "embed_tokens"]),
        "rslora": _save(root / "rs", 4, r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
    }


def test_compiled_model_takes_the_new_adapter_without_recompiling(adapters):
    torch._dynamo.reset()
    model = peftkit.PeftModel.from_pretrained(llama(), adapters["a"]).eval()
    before = _logits(model)
    peftkit.prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    assert model.peft_config["default"].r == 8
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        first = compiled(input_ids=IDS).logits
        peftkit.hotswap_adapter(compiled, adapters["b"], adapter_name="default")
        second = compiled(input_ids=IDS).logits
    fresh = _logits(peftkit.PeftModel.from_pretrained(llama(), adapters["b"]).eval())
    assert (first - before).abs().max() <= 1e-5  # padding and tensor scalings change nothing
    assert (second - fresh).abs().max() <= 1e-5
    assert (second - first).abs().max() > 1e-2


@pytest.mark.parametrize("which", ["a", "rslora"])
def test_a_prepared_adapter_saved_and_loaded_again_computes_the_same(adapters, tmp_path, which):
    """Padding to target_rank changes r in the config: lora_alpha changes with it, so the saved
    adapter keeps each layer's scaling (alpha / r; rsLoRA alpha / sqrt(r))."""
    model = peftkit.PeftModel.from_pretrained(llama(), adapters[which]).eval()
    before = _logits(model)
    peftkit.prepare_model_for_compiled_hotswap(model, target_rank=16, config=model.peft_config)
    model.save_pretrained(str(tmp_path))
    reloaded = peftkit.PeftModel.from_pretrained(llama(), str(tmp_path)).eval()
    assert reloaded.peft_config["default"].r == 16
    assert (_logits(reloaded) - before).abs().max() <= 1e-5


def test_hotswap_without_compile_equals_a_fresh_load(adapters):
    model = peftkit.PeftModel.from_pretrained(llama(), adapters["a"]).eval()  # q, v, embeddings at rank 4
    params = {id(p) for p in model.parameters()}
    peftkit.hotswap_adapter(model, adapters["d"], "default")  # rank 2, alpha 16, no v_proj
    assert {id(p) for p in model.parameters()} == params  # in place
    fresh = _logits(peftkit.PeftModel.from_pretrained(llama(), adapters["d"]).eval())
    assert (_logits(model) - fresh).abs().max() <= 1e-5


def test_incompatible_adapters_are_refused_naming_the_problem(adapters):
    model = peftkit.PeftModel.from_pretrained(llama(), adapters["a"]).eval()
    before = _logits(model)
    with pytest.raises(ValueError, match=r"k_proj\.lora_A\.weight"):  # c adapts k_proj, a does not
        peftkit.hotswap_adapter(model, adapters["c"], "default")
    with pytest.raises(ValueError, match="use_rslora differs"):
        peftkit.hotswap_adapter(model, adapters["rslora"], "default")
    with pytest.raises(ValueError, match=r"its rank is larger.*target_rank"):  # rank 8 into rank 4, not padded
        peftkit.hotswap_adapter(model, adapters["b"], "default")
    with pytest.raises(ValueError, match="'other' is not loaded"):
        peftkit.hotswap_adapter(model, adapters["b"], "other")
    with pytest.raises(TypeError, match=r"unsupported keyword arguments \['revision'\]"):
        peftkit.hotswap_adapter(model, adapters["b"], "default", revision="main")
    assert torch.equal(_logits(model), before)  # nothing changed by the refused swaps
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        peftkit.hotswap_adapter(model, adapters["a"], "default")
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="smaller than the rank"):
        peftkit.prepare_model_for_compiled_hotswap(model, target_rank=2)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="before torch.compile"):
        peftkit.prepare_model_for_compiled_hotswap(compiled, target_rank=8)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"]])
def test_peft_saved_adapters_swap_as_in_peft(targets, tmp_path):
    """Adapters saved by peft: peftkit's hotswap gives a fresh load's outputs and, where peft's own
    hotswap runs, peft's. (peft 0.21's hotswap fails with a KeyError on the embedding matrix
    peft saves beside an embedding adapter; peftkit copies it, as loading does.)"""
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    folders = []
    for seed, kwargs in ((1, dict(r=4, lora_alpha=8)), (2, dict(r=2, lora_alpha=16))):
        model = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=targets, **kwargs))
        perturb_trainable(model, seed=seed, scale=0.3)
        model.save_pretrained(str(tmp_path / str(seed)))
        folders.append(str(tmp_path / str(seed)))
    ours = peftkit.PeftModel.from_pretrained(llama(), folders[0]).eval()
    before = _logits(ours)
    peftkit.hotswap_adapter(ours, folders[1], "default")
    fresh = _logits(peftkit.PeftModel.from_pretrained(llama(), folders[1]).eval())
    assert (_logits(ours) - fresh).abs().max() <= 1e-5 < (before - fresh).abs().max()
    if "embed_tokens" not in targets:
        theirs = peft.PeftModel.from_pretrained(llama(), folders[0]).eval()
        peft_hotswap(theirs, folders[1], "default", torch_device="cpu")
        assert (_logits(ours) - _logits(theirs)).abs().max() <= 1e-5
