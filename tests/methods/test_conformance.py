"""Every adapter method through one contract, on tiny models, with `peft` as the reference.

A row of CASES names a method, how to build its peftkit config and the equivalent `peft` config,
and the base model. Whole-model methods (prompt and prefix tuning) are rows too, with `mergeable=False`
and `zero_init=False` (a fresh prompt changes the output).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrConfig
from tiny_models import gpt2, inputs_for, llama, perturb_trainable, twin
from tiny_models import logits as all_logits

WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Case:
    id: str
    make_model: Callable[[], torch.nn.Module]
    kind: str  # input batch kind for tiny_models.inputs_for
    ours: Callable[[], peftkit.PeftConfig]
    theirs: Callable[[], object]
    zero_init: bool = True  # a fresh adapter leaves the output unchanged
    mergeable: bool = True  # merge_adapter / unmerge_adapter / merge_and_unload apply


def _both(ours_cls, theirs_cls, **kwargs):
    return (lambda: ours_cls(**kwargs)), (lambda: theirs_cls(**kwargs))


def _case(id, make_model, kind, classes, kwargs, **flags):
    ours, theirs = _both(*classes, **kwargs)
    return Case(id, make_model, kind, ours, theirs, **flags)


LORA = (peftkit.LoraConfig, peft.LoraConfig)
IA3 = (IA3Config, peft.IA3Config)
LOHA = (LoHaConfig, peft.LoHaConfig)
LOKR = (LoKrConfig, peft.LoKrConfig)
PROMPT = (peftkit.PromptTuningConfig, peft.PromptTuningConfig)
PREFIX = (peftkit.PrefixTuningConfig, peft.PrefixTuningConfig)

CASES = [
    _case("lora-llama", llama, "llama", LORA, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    _case("ia3-llama-defaults", llama, "llama", IA3, dict(task_type="CAUSAL_LM")),
    _case("ia3-gpt2-conv1d", gpt2, "gpt2", IA3, dict(target_modules=["c_attn", "mlp.c_proj", "c_fc"],
                                                      feedforward_modules=["mlp.c_proj"])),
    _case("loha-llama", llama, "llama", LOHA, dict(r=4, alpha=8, target_modules="all-linear")),
    _case("lokr-llama", llama, "llama", LOKR, dict(r=4, alpha=8, target_modules="all-linear")),
    _case("lokr-llama-decomposed", llama, "llama", LOKR,
          dict(r=1, alpha=2, target_modules=["q_proj", "gate_proj", "down_proj"], decompose_both=True,
               decompose_factor=4)),
    _case("prompt-tuning-llama", llama, "llama", PROMPT, dict(task_type="CAUSAL_LM", num_virtual_tokens=4),
          zero_init=False, mergeable=False),
    _case("prefix-tuning-llama", llama, "llama", PREFIX, dict(task_type="CAUSAL_LM", num_virtual_tokens=4),
          zero_init=False, mergeable=False),
]
IDS = [c.id for c in CASES]


def _adapted(case: Case, seed: int = 3):
    """(peftkit model with non-trivial adapter weights, its base's twin, batch, base logits)."""
    base = case.make_model()
    spare = twin(base)
    batch = inputs_for(case.kind)
    plain = logits(base, batch)
    model = peftkit.get_peft_model(base, case.ours())
    perturb_trainable(model, seed=seed)
    return model, spare, batch, plain


def logits(model, batch) -> torch.Tensor:
    """Logits of the real positions (prompt tuning also returns its virtual tokens' logits)."""
    return all_logits(model, batch)[:, -batch["input_ids"].shape[1]:]


def _file_state(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(str(folder), WEIGHTS))


def _loss(model, batch) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_leaves_the_output_unchanged(case):
    if not case.zero_init:
        pytest.skip(f"{case.id} has no zero-effect init")
    base = case.make_model()
    batch = inputs_for(case.kind)
    plain = logits(base, batch)
    assert torch.equal(logits(peftkit.get_peft_model(base, case.ours()), batch), plain)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_merge_unmerge_and_merge_and_unload(case):
    model, _, batch, plain = _adapted(case)
    adapted = logits(model, batch)
    assert (adapted - plain).abs().max() > 1e-3  # the perturbed adapter does something
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), plain)
    if not case.mergeable:
        return
    model.merge_adapter()
    assert (logits(model, batch) - adapted).abs().max() < 1e-5
    with model.disable_adapter():  # disabling a merged adapter unmerges it
        assert (logits(model, batch) - plain).abs().max() < 1e-5
    model.merge_adapter()
    model.unmerge_adapter()
    assert (logits(model, batch) - adapted).abs().max() < 1e-5
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.base.AdapterLayer) for m in merged.modules())
    assert (logits(merged, batch) - adapted).abs().max() < 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_and_load_round_trip_in_peftkit(case, tmp_path):
    model, spare, batch, _ = _adapted(case)
    expected = logits(model, batch)
    model.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(spare, str(tmp_path))
    # Equal tensors; the logits may differ in the last bit (CPU kernels depend on memory alignment).
    assert (logits(loaded, batch) - expected).abs().max() < 1e-6
    saved = _file_state(tmp_path)
    assert all((key.startswith("base_model.model.") or key == "prompt_embeddings") and ".default" not in key
               for key in saved)
    assert all(torch.equal(saved[k], v) for k, v in loaded.adapter_state_dict().items())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    model, spare, batch, _ = _adapted(case)
    ours = logits(model, batch)
    model.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(spare, str(tmp_path / "ours"))
    assert (logits(theirs, batch) - ours).abs().max() <= 1e-5
    # peft re-saves exactly the tensors we wrote, under the same keys.
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_state, theirs_state = _file_state(tmp_path / "ours"), _file_state(tmp_path / "theirs")
    assert sorted(ours_state) == sorted(theirs_state)
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    base = case.make_model()
    spare = twin(base)
    batch = inputs_for(case.kind)
    plain = logits(base, batch)
    reference = peft.get_peft_model(base, case.theirs())
    perturb_trainable(reference)
    theirs = logits(reference, batch)
    assert (theirs - plain).abs().max() > 1e-3
    reference.save_pretrained(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peftkit.PeftModel.from_pretrained(spare, str(tmp_path))
    assert not [str(w.message) for w in caught if "Loading adapter" in str(w.message)]  # no missing/unexpected keys
    assert (logits(loaded, batch) - theirs).abs().max() <= 1e-5
    # The adapter peft built from the same config has the same tensors (names and shapes) as ours.
    fresh = peftkit.get_peft_model(case.make_model(), case.ours())
    assert {k: tuple(v.shape) for k, v in fresh.adapter_state_dict().items()} == \
           {k: tuple(v.shape) for k, v in _file_state(tmp_path).items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_adapter_parameters_are_trainable_and_get_gradients(case):
    model = peftkit.get_peft_model(case.make_model(), case.ours())
    model.train()
    batch = inputs_for(case.kind)
    _loss(model, batch).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    # Exactly the saved adapter tensors are trainable (same element count as the adapter file).
    saved = model.adapter_state_dict()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(t.numel() for t in saved.values())
    trainable_ptrs = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    assert {t.data_ptr() for t in saved.values()} == trainable_ptrs


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_few_adamw_steps_lower_the_loss(case):
    torch.manual_seed(0)
    # Eval mode: the base model's own dropout would make six steps' losses too noisy to compare.
    model = peftkit.get_peft_model(case.make_model(), case.ours()).eval()
    batch = inputs_for(case.kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(6):
        loss = _loss(model, batch)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = _loss(model, batch).item()
    assert final < losses[0] - 0.01, (losses, final)


TREE_CASES = CASES + [
    _case("lora-llama-head", llama, "llama", LORA, dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    _case("dora-llama", llama, "llama", LORA, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
]


@pytest.mark.parametrize("case", TREE_CASES, ids=[c.id for c in TREE_CASES])
def test_same_module_tree_and_names_as_peft(case):
    # Code written for peft navigates model.base_model.model..., builds optimizer groups and
    # FSDP policies from parameter names and loads PeftModel.state_dict()s saved with peft.
    ours = peftkit.get_peft_model(case.make_model(), case.ours())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(case.make_model(), case.theirs())
    named = lambda m: {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert named(ours) == named(theirs)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    # a state dict saved from peft loads into peftkit's model with nothing missing or left over
    perturb_trainable(theirs, seed=5)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    batch = inputs_for(case.kind)
    torch.testing.assert_close(logits(ours.eval(), batch), logits(theirs.eval(), batch), rtol=1e-5, atol=1e-5)
