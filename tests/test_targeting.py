"""Target matching follows PEFT's rules exactly: compare adapted module sets with `peft`."""
import peft
import pytest
import torch

import peftkit
from tiny_models import FACTORIES

CONFIGS = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=r".*layers\.1\..*proj")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0)),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*mlp.*")),
    ("llama", dict(target_modules=["model.layers.1.self_attn.k_proj", "embed_tokens"])),
    ("llama", dict()),
    ("gpt2", dict()),
    ("gpt2", dict(target_modules="all-linear")),
    ("bert", dict(task_type="SEQ_CLS", target_modules="all-linear")),
    ("bert", dict(task_type="SEQ_CLS")),
    ("t5", dict()),
]



@pytest.mark.parametrize("kind,kwargs", CONFIGS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CONFIGS)])
def test_same_modules_as_peft(kind, kwargs):
    ours = peftkit.get_peft_model(FACTORIES[kind](), peftkit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(FACTORIES[kind](), peft.LoraConfig(**kwargs))
    our_paths = sorted(n.replace("base_model.model.", "", 1) for n, m in ours.named_modules()
                       if isinstance(m, peftkit.methods.lora.LoraLayer))
    their_paths = sorted(n.replace("base_model.model.", "", 1) for n, m in theirs.named_modules()
                         if isinstance(m, peft.tuners.lora.LoraLayer))
    assert our_paths and our_paths == their_paths


def test_all_linear_skips_the_output_head():
    model = peftkit.get_peft_model(FACTORIES["llama"](), peftkit.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in model.peft_config["default"].target_modules
    assert type(model.base_model.lm_head).__name__ == "Linear"



def test_conv1d_is_found_by_class_and_by_the_copies_remote_code_carries():
    from transformers.pytorch_utils import Conv1D as HFConv1D

    from peftkit.targeting import is_conv1d, is_linear, linear_types

    class Conv1D(torch.nn.Module):  # a remote-code model's own copy of GPT-2's layer
        def __init__(self):
            super().__init__()
            self.nf = 3

    class Subclass(HFConv1D):
        pass

    assert is_conv1d(HFConv1D(nf=3, nx=2)) and is_conv1d(Conv1D()) and is_conv1d(Subclass(nf=3, nx=2))
    assert not is_conv1d(torch.nn.Linear(2, 3)) and not is_conv1d(torch.nn.Conv1d(2, 3, 1))
    assert is_linear(torch.nn.Linear(2, 3)) and is_linear(Conv1D()) and not is_linear(torch.nn.Embedding(2, 3))
    assert linear_types() == (torch.nn.Linear, HFConv1D)


def test_all_linear_for_a_second_adapter_targets_the_adapted_layers_too():
    """On a model that already holds an adapter, "all-linear" means the model's linear layers:
    the adapted ones by their own names (not their base_layer / lora_A inside), as in peft."""
    import copy

    import peft

    import peftkit
    from tiny_models import llama

    base = llama()
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["q_proj"]), "a1")
    ours.add_adapter("a2", peftkit.LoraConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"]), adapter_name="a1")
    theirs.add_adapter("a2", peft.LoraConfig(target_modules="all-linear"))

    def adapted(model):
        return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and "a2" in m.lora_A)

    assert len(adapted(ours)) == 14 and adapted(ours) == adapted(theirs)
    assert sorted(ours.peft_config["a2"].target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                            "up_proj", "v_proj"]
