"""`AutoPeftModelFor*.from_pretrained(ADAPTER_DIR)`: the base named in adapter_config.json loaded
with the task's transformers class and the adapter attached, equal to loading both by hand."""
import peft
import pytest
import torch
import transformers

import peftkit
from tiny_models import bert_cls, inputs_for, llama, perturb_trainable, t5

CASES = {
    # name: (base factory, inputs kind, task_type, LoRA kwargs, peftkit class, transformers class)
    "causal": (llama, "llama", "CAUSAL_LM", dict(target_modules=["q_proj", "v_proj"]),
               peftkit.AutoPeftModelForCausalLM, transformers.AutoModelForCausalLM),
    "seq-cls": (lambda: bert_cls(num_labels=3), "bert", "SEQ_CLS", dict(),
                peftkit.AutoPeftModelForSequenceClassification, transformers.AutoModelForSequenceClassification),
    "token-cls": (lambda: bert_cls(num_labels=5), "bert", "TOKEN_CLS", dict(target_modules=["query", "value"]),
                  peftkit.AutoPeftModelForTokenClassification, transformers.AutoModelForTokenClassification),
    "seq2seq": (t5, "t5", "SEQ_2_SEQ_LM", dict(), peftkit.AutoPeftModelForSeq2SeqLM, transformers.AutoModelForSeq2SeqLM),
}


def _saved(tmp_path, case):
    factory, _, task_type, lora, _, auto = CASES[case]
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    factory().save_pretrained(str(base_dir))
    base = auto.from_pretrained(str(base_dir))
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, lora_alpha=8, task_type=task_type,
                                                            base_model_name_or_path=str(base_dir), **lora))
    perturb_trainable(model, scale=0.2)
    model.save_pretrained(str(adapter_dir))
    return str(base_dir), str(adapter_dir)


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_class_equals_loading_by_hand(case, tmp_path):
    _, kind, _, _, ours_cls, auto = CASES[case]
    base_dir, adapter_dir = _saved(tmp_path, case)
    batch = inputs_for(kind)
    loaded = ours_cls.from_pretrained(adapter_dir)
    assert isinstance(loaded, peftkit.PeftModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False, as peft
    extra = {"num_labels": CASES[case][0]().config.num_labels} if "cls" in case else {}
    by_hand = peftkit.PeftModel.from_pretrained(auto.from_pretrained(base_dir, **extra), adapter_dir).eval()
    plain = _out(auto.from_pretrained(base_dir, **extra), batch)
    ours = _out(loaded, batch)
    assert (ours - _out(by_hand, batch)).abs().max() <= 1e-6
    if case != "seq-cls":  # a new (random) head for the plain model: no comparison
        assert (ours - plain).abs().max() > 1e-3  # the adapter is attached
    theirs = getattr(peft, ours_cls.__name__).from_pretrained(adapter_dir)
    assert (ours - _out(theirs, batch)).abs().max() <= 1e-5


def test_kwargs_reach_the_base_and_generic_class_follows_the_task(tmp_path):
    _, adapter_dir = _saved(tmp_path, "causal")
    model = peftkit.AutoPeftModel.from_pretrained(adapter_dir, dtype=torch.bfloat16, is_trainable=True)
    assert model.get_base_model().model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert isinstance(model.get_base_model(), transformers.LlamaForCausalLM)
    assert any(p.requires_grad for p in model.parameters())  # is_trainable=True


def test_wrong_class_and_bad_arguments_are_refused(tmp_path):
    _, adapter_dir = _saved(tmp_path, "causal")
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'.*AutoPeftModelForCausalLM"):
        peftkit.AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    with pytest.raises(TypeError, match=r"unsupported keyword arguments \['dtyp'\]"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtyp=torch.float16)
    with pytest.raises(TypeError, match="revision"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, revision="main")
    with pytest.raises(ValueError, match="cannot load the base model .*nowhere"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, base_model_name_or_path=str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="from_pretrained"):
        peftkit.AutoPeftModelForCausalLM()


def test_quantization_config_reaches_the_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    _, adapter_dir = _saved(tmp_path, "causal")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    ours = peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, quantization_config=q)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, quantization_config=q)
    assert type(ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    batch = inputs_for("llama")
    assert (_out(ours, batch) - _out(theirs, batch)).abs().max() <= 1e-5


def test_adapter_without_task_type(tmp_path):
    """peft refuses an adapter without task_type here; peftkit takes the class asked for, or
    (AutoPeftModel) the class the base config names."""
    llama().save_pretrained(str(tmp_path / "base"))
    model = peftkit.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                   peftkit.LoraConfig(r=4, target_modules=["q_proj"],
                                                      base_model_name_or_path=str(tmp_path / "base")))
    perturb_trainable(model, scale=0.2)
    model.save_pretrained(str(tmp_path / "adapter"))
    batch = inputs_for("llama")
    generic = peftkit.AutoPeftModel.from_pretrained(str(tmp_path / "adapter"))
    causal = peftkit.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert type(generic.get_base_model()).__name__ == "LlamaForCausalLM"
    assert torch.equal(_out(generic, batch), _out(causal, batch))
    assert (_out(causal, batch) - _out(model.eval(), batch)).abs().max() <= 1e-6
