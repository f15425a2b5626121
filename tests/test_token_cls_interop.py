"""TOKEN_CLS adapters: the classifier head is trained in full and saved, and an adapter saved by
peftkit loads in `peft` with the same logits and loss (and the other way round)."""
import os

import peft
import pytest
import torch
from tiny_models import perturb_trainable, twin

import peftkit

NUM_LABELS = 5
CASES = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    "lora-dense-dropout": {"r": 2, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["dense"]},
}


def bert_token_cls(seed: int = 0):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=64, num_labels=NUM_LABELS)
    return BertForTokenClassification(cfg).eval()


def batch_with_labels(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, 9), generator=g)
    labels = torch.randint(0, NUM_LABELS, (2, 9), generator=g)
    labels[:, 0] = -100  # e.g. [CLS] and continuation sub-words carry no label
    labels[1, 5:] = -100
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.loss


def _dir(tmp_path, adapter_name: str) -> str:
    return str(tmp_path) if adapter_name == "default" else os.path.join(str(tmp_path), adapter_name)


def test_head_is_added_to_modules_to_save_and_trained_in_full():
    model = peftkit.get_peft_model(bert_token_cls(), peftkit.LoraConfig(r=4, target_modules=["query"],
                                                                       task_type="TOKEN_CLS"))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = {name for name in trainable if "classifier" in name}
    assert len(head) == 2 and all(".modules_to_save.default." in name for name in head)  # weight + bias
    assert sum(p.numel() for n, p in model.named_parameters() if n in head) == 32 * NUM_LABELS + NUM_LABELS
    keys = set(model.adapter_state_dict())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_all_linear_leaves_the_head_to_modules_to_save(tmp_path):
    base = bert_token_cls()
    reference_base = twin(base)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules="all-linear", task_type="TOKEN_CLS"))
    assert "classifier" not in model.peft_config["default"].target_modules
    perturb_trainable(model)
    batch = batch_with_labels()
    ours, our_loss = outputs(model, batch)
    model.save_pretrained(str(tmp_path))
    # peft cannot build this adapter itself (it puts LoRA on the head, then fails to wrap it for
    # modules_to_save), but it loads the one peftkit saved.
    loaded = peft.PeftModel.from_pretrained(reference_base, str(tmp_path))
    theirs, their_loss = outputs(loaded, batch)
    assert (ours - theirs).abs().max() <= 1e-5
    assert abs(float(our_loss) - float(their_loss)) <= 1e-5


@pytest.mark.parametrize("adapter_name", ["default", "second"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_token_cls_adapter_loads_in_peft(case, adapter_name, tmp_path):
    base = bert_token_cls()
    reference_base = twin(base)
    batch = batch_with_labels()
    plain, plain_loss = outputs(base, batch)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(task_type="TOKEN_CLS", **CASES[case]),
                                   adapter_name=adapter_name)
    perturb_trainable(model)
    model.eval()
    ours, our_loss = outputs(model, batch)
    model.save_pretrained(str(tmp_path))

    loaded = peft.PeftModel.from_pretrained(reference_base, _dir(tmp_path, adapter_name), adapter_name=adapter_name)
    assert type(loaded).__name__ == "PeftModelForTokenClassification"
    theirs, their_loss = outputs(loaded, batch)
    assert (ours - plain).abs().max() > 1e-3  # the adapter (and the head copy) do something
    assert (ours - theirs).abs().max() <= 1e-5
    assert abs(float(our_loss) - float(their_loss)) <= 1e-5 and abs(float(our_loss) - float(plain_loss)) > 1e-4


@pytest.mark.parametrize("adapter_name", ["default", "second"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_token_cls_adapter_loads_in_peftkit(case, adapter_name, tmp_path):
    base = bert_token_cls()
    our_base = twin(base)
    batch = batch_with_labels()
    reference = peft.get_peft_model(base, peft.LoraConfig(task_type="TOKEN_CLS", **CASES[case]),
                                    adapter_name=adapter_name)
    perturb_trainable(reference)
    reference.eval()
    theirs, their_loss = outputs(reference, batch)
    reference.save_pretrained(str(tmp_path))

    loaded = peftkit.PeftModel.from_pretrained(our_base, _dir(tmp_path, adapter_name), adapter_name=adapter_name)
    ours, our_loss = outputs(loaded, batch)
    assert (ours - theirs).abs().max() <= 1e-5
    assert abs(float(our_loss) - float(their_loss)) <= 1e-5


def test_positional_input_ids_and_labels_reach_the_base_model():
    model = peftkit.get_peft_model(bert_token_cls(), peftkit.LoraConfig(r=4, target_modules=["query"],
                                                                       task_type="TOKEN_CLS"))
    perturb_trainable(model)
    model.eval()
    batch = batch_with_labels()
    by_name, loss = outputs(model, batch)
    with torch.no_grad():
        positional = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    assert torch.equal(positional.logits, by_name)
    expected = torch.nn.functional.cross_entropy(by_name.reshape(-1, NUM_LABELS), batch["labels"].reshape(-1))
    assert abs(float(positional.loss) - float(expected)) <= 1e-6 and abs(float(loss) - float(expected)) <= 1e-6
