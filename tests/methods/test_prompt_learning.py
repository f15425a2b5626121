"""Prompt tuning and prefix tuning: PEFT interop both ways, generate, init, training, errors.

Oracle notes (peft 0.21.2 with transformers 5.24):
- peft's prefix-tuning forward for BertForSequenceClassification refuses to run, because it
  looks for a `past_key_values` argument that transformers renamed to `cache`. For that case the
  reference is peft's own prefix (`get_prompt`) fed through the model with the new name.
- peft's `generate` for prompt learning is broken on this transformers (it looks for
  `past_key_values` in the generation inputs, finds none, and re-inserts the virtual tokens at
  every step; prefix tuning's prefix is dropped). The reference is greedy decoding by repeated
  full forward passes of the peft model.
"""
import json
import os
import shutil

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from tiny_models import bert_cls, gpt2, inputs_for, llama, logits, perturb_trainable, twin

NVT = 3
CASES = {
    "llama-prompt": ("llama", "PROMPT_TUNING", {}),
    "llama-prefix": ("llama", "PREFIX_TUNING", {}),
    "llama-prefix-projection": ("llama", "PREFIX_TUNING", {"prefix_projection": True, "encoder_hidden_size": 16}),
    "gpt2-prefix": ("gpt2", "PREFIX_TUNING", {}),
    "bert-prompt": ("bert", "PROMPT_TUNING", {}),
    "bert-prefix": ("bert", "PREFIX_TUNING", {}),
    "bert-prefix-projection": ("bert", "PREFIX_TUNING", {"prefix_projection": True, "encoder_hidden_size": 16}),
}
OURS = {"PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig}
THEIRS = {"PROMPT_TUNING": peft.PromptTuningConfig, "PREFIX_TUNING": peft.PrefixTuningConfig}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _base(kind):
    if kind != "llama":
        return bert_cls() if kind == "bert" else gpt2()
    model = llama()
    model.generation_config.eos_token_id = None  # greedy references run to max length
    return model


def _config(table, case, **extra):
    kind, peft_type, kwargs = CASES[case]
    return table[peft_type](task_type=TASK[kind], num_virtual_tokens=NVT, **kwargs, **extra)


def _batch():
    batch = inputs_for("llama")
    batch["attention_mask"][0, :2] = 0  # a left-padded row, so the extended mask matters
    return batch


def _peft_logits(model, case, batch):
    kind, peft_type, _ = CASES[case]
    if kind == "bert" and peft_type == "PREFIX_TUNING":
        with torch.no_grad():
            cache = model.get_prompt(batch_size=batch["input_ids"].shape[0])
            mask = torch.cat((torch.ones(2, NVT, dtype=torch.long), batch["attention_mask"]), dim=1)
            return model.base_model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits
    return logits(model, batch)


def _changed(adapted, plain):
    """Max difference to the base output over the real (non-virtual) positions."""
    return (adapted[:, -plain.shape[1]:] - plain).abs().max() if adapted.dim() == 3 else (adapted - plain).abs().max()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    kind = CASES[case][0]
    base = _base(kind)
    reference_base = twin(base)
    batch = _batch()
    plain = logits(base, batch)
    model = peftkit.get_peft_model(base, _config(OURS, case))
    perturb_trainable(model, scale=0.5)
    ours = logits(model, batch)
    model.save_pretrained(str(tmp_path))

    loaded = peft.PeftModel.from_pretrained(reference_base, str(tmp_path))
    theirs = _peft_logits(loaded, case, batch)
    assert ours.shape == theirs.shape
    assert _changed(ours, plain) > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    kind = CASES[case][0]
    base = _base(kind)
    our_base = twin(base)
    batch = _batch()
    plain = logits(base, batch)
    reference = peft.get_peft_model(base, _config(THEIRS, case))
    perturb_trainable(reference, scale=0.5)
    theirs = _peft_logits(reference, case, batch)
    reference.save_pretrained(str(tmp_path))

    loaded = peftkit.PeftModel.from_pretrained(our_base, str(tmp_path))
    ours = logits(loaded, batch)
    assert _changed(theirs, plain) > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_parameters_match_peft(case):
    kind = CASES[case][0]
    base = _base(kind)
    ours = peftkit.get_peft_model(twin(base), _config(OURS, case))
    theirs = peft.get_peft_model(base, _config(THEIRS, case))
    names = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert names == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_saved_files_follow_the_peft_layout(tmp_path):
    model = peftkit.get_peft_model(_base("llama"), _config(OURS, "llama-prefix-projection"))
    model.save_pretrained(str(tmp_path / "prefix"))
    with safe_open(str(tmp_path / "prefix" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        # GQA: 2 key/value heads of size 8 per layer, 2 layers, key and value -> 64 per token.
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {"prompt_embeddings": (NVT, 64)}
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert list(config) == sorted(config)
    assert config["peft_type"] == "PREFIX_TUNING" and config["inference_mode"] is True
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (16, 2, 2)
    assert config["encoder_hidden_size"] == 16 and config["prefix_projection"] is True

    model = peftkit.get_peft_model(_base("bert"), _config(OURS, "bert-prompt"))
    model.save_pretrained(str(tmp_path / "prompt"))
    state = load_file(str(tmp_path / "prompt" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompt_embeddings": (NVT, 32), "base_model.classifier.weight": (3, 32), "base_model.classifier.bias": (3,)}
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "RANDOM" and config["task_type"] == "SEQ_CLS"
    assert (config["token_dim"], config["num_attention_heads"], config["num_transformer_submodules"]) == (32, 4, 1)
    assert config["modules_to_save"] == ["classifier", "score"]


def _greedy_by_forward(model, batch, steps):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat((ids, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1)
    return ids


@pytest.mark.parametrize("case", ["llama-prompt", "llama-prefix", "llama-prefix-projection"])
def test_generate_matches_greedy_decoding_of_peft(case, tmp_path):
    base = _base("llama")
    reference_base = twin(base)
    batch = inputs_for("llama")
    model = peftkit.get_peft_model(base, _config(OURS, case))
    perturb_trainable(model, scale=1.0)
    model.save_pretrained(str(tmp_path))
    expected = _greedy_by_forward(peft.PeftModel.from_pretrained(reference_base, str(tmp_path)), batch, 6)

    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), expected)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False), expected)
    with model.disable_adapter():
        plain = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, reference_base.generate(**batch, max_new_tokens=6, do_sample=False))
    assert not torch.equal(plain, expected)
    assert "prepare_inputs_for_generation" not in vars(base)  # the temporary hook is gone


@pytest.mark.parametrize("case", ["llama-prompt", "bert-prefix"])
def test_disable_adapter_gives_the_base_output(case):
    kind = CASES[case][0]
    base = _base(kind)
    batch = _batch()
    expected = logits(base, batch)
    model = peftkit.get_peft_model(base, _config(OURS, case))
    perturb_trainable(model, scale=0.5)  # also changes the SEQ_CLS head copy
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), expected)
    assert _changed(logits(model, batch), expected) > 1e-3


@pytest.mark.parametrize("case", ["llama-prompt", "llama-prefix"])
def test_merge_is_refused(case):
    model = peftkit.get_peft_model(_base("llama"), _config(OURS, case))
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=f"{CASES[case][1]} .*has no weights to merge"):
            call()


def test_causal_lm_labels_are_padded_for_the_virtual_tokens():
    base = _base("llama")
    reference = peft.get_peft_model(twin(base), _config(THEIRS, "llama-prompt"))
    model = peftkit.get_peft_model(base, _config(OURS, "llama-prompt"))
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder["default"].embedding.weight)
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
        theirs = reference(**batch, labels=labels).loss
    # The last virtual position predicts the first real token; the virtual positions get no target.
    shifted = out.logits[:, NVT - 1:-1].reshape(-1, 64)
    manual = torch.nn.functional.cross_entropy(shifted, labels.reshape(-1), ignore_index=-100)
    assert out.logits.shape == (2, NVT + 9, 64)
    assert abs(float(out.loss) - float(manual)) < 1e-5 and abs(float(out.loss) - float(theirs)) < 1e-5


def test_positional_arguments_reach_the_right_parameters():
    model = peftkit.get_peft_model(_base("llama"), _config(OURS, "llama-prefix"))
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]).logits, logits(model, batch))


def _tokenizer(folder):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "classify the sentiment of this review".split()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as fh:
        fh.write("\n".join(words) + "\n")
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("num_virtual_tokens", [5, 11])  # the text has 8 ids: truncated, then repeated
def test_text_init_matches_peft(num_virtual_tokens, tmp_path):
    tokenizer = _tokenizer(tmp_path / "tok")
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="classify the sentiment of this review", tokenizer_name_or_path=tokenizer)
    base = _base("llama")
    theirs = peft.get_peft_model(twin(base), peft.PromptTuningConfig(**kwargs))
    ours = peftkit.get_peft_model(base, PromptTuningConfig(**kwargs))
    weight = ours.prompt_encoder["default"].embedding.weight
    ids = ([2, 5, 6, 7, 8, 9, 10, 3] * 2)[:num_virtual_tokens]  # [CLS] ... [SEP], repeated / truncated
    assert torch.equal(weight, base.get_input_embeddings().weight[ids])
    assert torch.equal(weight, theirs.prompt_encoder["default"].embedding.weight)
    # Loading for inference does not re-run the init, so the tokenizer is no longer needed.
    ours.save_pretrained(str(tmp_path / "adapter"))
    shutil.rmtree(tokenizer)
    loaded = peftkit.PeftModel.from_pretrained(_base("llama"), str(tmp_path / "adapter"))
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, weight)


def test_sample_vocab_init_takes_rows_of_the_word_embeddings():
    base = _base("llama")
    model = peftkit.get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB))
    words = base.get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (words - row).abs().sum(-1).min() == 0


@pytest.mark.parametrize("case", ["llama-prompt", "bert-prefix-projection"])
def test_a_few_adamw_steps_lower_the_loss_and_touch_only_the_adapter(case):
    kind = CASES[case][0]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(_base(kind), _config(OURS, case))
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    batch = _batch()
    labels = batch["input_ids"] if kind == "llama" else torch.tensor([0, 2])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # A random tiny Llama is near-uniform, so its prompt gains are small but steady.
    assert all(after < before for before, after in zip(losses, losses[1:]))
    assert losses[-1] < 0.99 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.base_model.named_parameters() if n in frozen)


def test_round_trip_with_several_adapters(tmp_path):
    base = _base("llama")
    batch = _batch()
    model = peftkit.get_peft_model(twin(base), _config(OURS, "llama-prefix"))
    model.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    perturb_trainable(model, scale=0.5)
    first = logits(model, batch)
    model.set_adapter("other")
    second = logits(model, batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.other.embedding.weight"]
    model.save_pretrained(str(tmp_path))

    loaded = peftkit.PeftModel.from_pretrained(base, str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    assert torch.equal(logits(loaded, batch), first)
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded, batch), second)
    loaded.delete_adapter("default")
    assert list(loaded.prompt_encoder) == ["other"]


def test_config_errors_list_every_problem():
    with pytest.raises(ConfigError) as err:
        PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=0, prompt_tuning_init="TEXT", token_dim=-1)
    message = str(err.value)
    for fragment in ("num_virtual_tokens=0", "token_dim=-1", "task_type='SEQ_2_SEQ_LM'", "tokenizer_name_or_path",
                     "prompt_tuning_init_text"):
        assert fragment in message
    with pytest.raises(ConfigError, match="init_weights='ones'.*\n.*token_dim=30 is not divisible"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, init_weights="ones", token_dim=30,
                           num_attention_heads=4)
    with pytest.raises(ConfigError, match="prompt_tuning_init='WORDS' is not one of"):
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="WORDS")


def test_unusable_setups_are_refused_clearly(tmp_path):
    # A projected prefix is saved as its projection output only, so it cannot be trained further.
    model = peftkit.get_peft_model(_base("llama"), _config(OURS, "llama-prefix-projection"))
    model.save_pretrained(str(tmp_path / "proj"))
    with pytest.raises(ValueError, match="prefix_projection=True.*is_trainable=False"):
        peftkit.PeftModel.from_pretrained(_base("llama"), str(tmp_path / "proj"), is_trainable=True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peftkit.get_peft_model(_base("llama"), _config(OURS, "llama-prefix")).gradient_checkpointing_enable()
    # A file whose prompt does not fit the config names the key and both shapes.
    model = peftkit.get_peft_model(_base("llama"), _config(OURS, "llama-prompt"))
    model.save_pretrained(str(tmp_path / "prompt"))
    path = str(tmp_path / "prompt" / "adapter_model.safetensors")
    save_file({"prompt_embeddings": torch.zeros(NVT + 1, 32)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"prompt_embeddings: the model expects \(3, 32\).* has \(4, 32\)"):
        peftkit.PeftModel.from_pretrained(_base("llama"), str(tmp_path / "prompt"))
    save_file({"prompt_embeddings": torch.zeros(NVT, 32), "base_model.extra.weight": torch.zeros(1)}, path)
    with pytest.warns(UserWarning, match=r"unexpected keys \(ignored\): \['base_model.extra.weight'\]"):
        peftkit.PeftModel.from_pretrained(_base("llama"), str(tmp_path / "prompt"))
