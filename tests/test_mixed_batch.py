"""Mixed-adapter batches (`adapter_names=`): each row computed with its own adapter, equal to
peft's mixed batch and to running the row alone with its adapter set."""
import peft
import pytest
import torch
import torch.nn as nn

import peftkit
from tiny_models import llama, perturb_trainable, t5

NAMES = ["a1", "a2", "__base__", "a1"]
A1 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
A2 = dict(r=8, lora_alpha=4, use_rslora=True, modules_to_save=["lm_head"],
          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 64, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """peftkit and peft models holding the same adapters a1 and a2 (a1 active)."""
    base = llama()
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(**A1), adapter_name="a1")
    model.add_adapter("a2", peftkit.LoraConfig(**A2))
    perturb_trainable(model, seed=1, scale=0.3)
    model.set_adapter("a2")
    for p in model.parameters():  # a2's parameters were frozen while a1 was perturbed
        p.requires_grad_(False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if ".a2" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.set_adapter("a1")
    folder = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(str(folder))
    reference = peft.PeftModel.from_pretrained(llama(), str(folder / "a1"), adapter_name="a1")
    reference.load_adapter(str(folder / "a2"), adapter_name="a2")
    return model.eval(), reference.eval()


def _row_alone(model, batch, row, name):
    one = {k: v[row:row + 1] for k, v in batch.items()}
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(**one).logits[0]
        model.set_adapter(name)
        try:
            return model(**one).logits[0]
        finally:
            model.set_adapter("a1")


def test_rows_get_their_adapters_as_in_peft(models):
    model, reference = models
    batch = _batch()
    with torch.no_grad():
        ours = model(**batch, adapter_names=NAMES).logits
        theirs = reference(**batch, adapter_names=NAMES).logits
        active_only = model(**batch).logits
    assert (ours - theirs).abs().max() <= 1e-5
    for row, name in enumerate(NAMES):
        assert (ours[row] - _row_alone(model, batch, row, name)).abs().max() <= 1e-5, (row, name)
    # the rows really differ by adapter: a2's and the base rows are not a1's output
    assert (ours[1] - active_only[1]).abs().max() > 1e-2 and (ours[2] - active_only[2]).abs().max() > 1e-2


def test_generate_with_adapter_names_matches_each_row_alone_and_peft(models):
    model, reference = models
    ids = _batch()["input_ids"][:3, :5]
    names = NAMES[:3]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        theirs = reference.generate(input_ids=ids, adapter_names=names, **kwargs)
        beams = model.generate(input_ids=ids, adapter_names=names, num_beams=2, **kwargs)
        beams_peft = reference.generate(input_ids=ids, adapter_names=names, num_beams=2, **kwargs)
        alone = []
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model.generate(input_ids=ids[row:row + 1], **kwargs)[0])
            else:
                model.set_adapter(name)
                alone.append(model.generate(input_ids=ids[row:row + 1], **kwargs)[0])
        model.set_adapter("a1")
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, torch.stack(alone))
    assert torch.equal(beams, beams_peft)
    assert len({tuple(r[5:].tolist()) for r in ours}) > 1  # the adapters lead to different continuations


def test_generate_repeats_names_for_returned_sequences(models):
    model, _ = models
    ids = _batch()["input_ids"][:2, :5]
    kwargs = dict(max_new_tokens=3, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=["a2", "__base__"], **kwargs)
        model.set_adapter("a2")
        first = model.generate(input_ids=ids[:1], **kwargs)
        model.set_adapter("a1")
    assert out.shape[0] == 4 and torch.equal(out[:2], first)  # top_k=1: sampling is greedy


def test_encoder_decoder_generate_with_beams():
    model = peftkit.get_peft_model(t5(), peftkit.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM"),
                                   adapter_name="x")
    perturb_trainable(model, scale=0.3)
    model.eval()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["__base__", "x"], **kwargs)
        with model.disable_adapter():
            base_row = model.generate(input_ids=ids[:1], **kwargs)
        adapted_row = model.generate(input_ids=ids[1:], **kwargs)
    width = max(base_row.shape[1], adapted_row.shape[1])
    assert torch.equal(mixed[0, :base_row.shape[1]], base_row[0]) and torch.equal(mixed[1, :adapted_row.shape[1]],
                                                                                   adapted_row[0])
    assert mixed.shape[1] == width


def test_conv2d_rows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model = peftkit.get_peft_model(net, peftkit.LoraConfig(r=2, target_modules=["0", "3"]), adapter_name="c1")
    model.add_adapter("c2", peftkit.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.eval()
    x = torch.randn(3, 3, 6, 6)
    names = ["c2", "c1", "__base__"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        expected = []
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected.append(model(x[row:row + 1])[0])
            else:
                model.set_adapter(name)
                expected.append(model(x[row:row + 1])[0])
    assert (mixed - torch.stack(expected)).abs().max() <= 1e-5
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_bad_calls_are_refused_clearly(models):
    model, _ = models
    batch = _batch()
    with pytest.raises(ValueError, match="3 names for a batch of 4 rows"):
        model(**batch, adapter_names=NAMES[:3])
    with pytest.raises(ValueError, match=r"unknown adapters \['a3'\]"):
        model(**batch, adapter_names=["a1", "a3", "a1", "a1"])
    with pytest.raises(TypeError, match="one adapter name"):
        model(**batch, adapter_names="a1")
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        model(**batch, adapter_names=NAMES)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            model(**batch, adapter_names=NAMES)
    finally:
        model.eval()
    model.merge_adapter()
    try:
        with pytest.raises(ValueError, match="merged"):
            model(**batch, adapter_names=NAMES)
    finally:
        model.unmerge_adapter()


def test_methods_without_mixed_batches_say_so():
    model = peftkit.get_peft_model(llama(), peftkit.IA3Config(target_modules=["k_proj", "down_proj"],
                                                              feedforward_modules=["down_proj"])).eval()
    with pytest.raises(ValueError, match="LoRA adapters only.*IA3"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["default", "__base__"])
    dora = peftkit.get_peft_model(llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).eval()
    with pytest.raises(ValueError, match="DoRA"):
        dora(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["default", "__base__"])


def test_benchmark_script_runs_and_both_sides_agree(tmp_path):
    """benchmarks/mixed_batch.py at a tiny shape: every configuration timed on both sides, same logits."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mixed_batch.py"
    spec = importlib.util.spec_from_file_location("mixed_batch_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--hidden", "64", "--layers", "1", "--vocab", "128", "--seq", "8", "--batch", "3",
                         "--rank", "4", "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {(r["side"], r["config"]) for r in result["rows"]} == {
        (s, c) for s in ("peftkit", "peft")
        for c in ("one adapter", "names: all a1", "names: a1/a2", "names: a1/a2/base")}
    assert all(r["s_per_forward"] > 0 and r["cpu_s_per_forward"] > 0 for r in result["rows"])
    assert max(result["max_abs_diff_to_peft"].values()) <= 1e-5


def test_quantized_base_rows_as_in_peft(tmp_path):
    """A bitsandbytes 4-bit base: the base layer runs once, each adapter on its rows; equal to peft."""
    pytest.importorskip("bitsandbytes")
    import transformers

    llama().save_pretrained(str(tmp_path / "base"))
    for seed, targets in enumerate((["q_proj", "v_proj"], ["k_proj", "down_proj"])):
        model = peftkit.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                       peftkit.LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM",
                                                          base_model_name_or_path=str(tmp_path / "base")))
        perturb_trainable(model, seed=seed, scale=0.3)
        model.save_pretrained(str(tmp_path / f"a{seed}"))
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    ours = peftkit.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a0"), quantization_config=q)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a0"), quantization_config=q)
    for model in (ours, theirs):
        model.load_adapter(str(tmp_path / "a1"), adapter_name="b")
    batch = _batch()
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = ours(**batch, adapter_names=names).logits
        assert (mixed - theirs(**batch, adapter_names=names).logits).abs().max() <= 1e-5
        ours.set_adapter("b")
        alone = ours(**{k: v[:1] for k, v in batch.items()}).logits
    assert (mixed[0] - alone[0]).abs().max() <= 1e-5
