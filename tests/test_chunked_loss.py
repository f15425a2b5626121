"""The chunked causal-LM loss (backbone + chunked lm_head/CE): `PeftModel.chunked_causal_lm_loss`,
the train-mode forward with labels, and the loop's loss, against the full-logits loss."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tiny_models
from peftkit import LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.kernels import fast_paths
from peftkit.train.loss import causal_lm_loss, fast_causal_lm_loss


def fused_causal_lm_loss(model, batch):
    return model.chunked_causal_lm_loss(batch)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_model(base, seed=1, **lora):
    """LoRA on every linear, adapter weights random (B = 0 would leave A without gradient)."""
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear")
    kwargs.update(lora)
    model = get_peft_model(base, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def make_batch(vocab=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # right padding
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step(model, batch, loss_fn, seed=5):
    """(loss_sum, n_targets, {name: grad}) of one forward/backward; `seed` fixes the dropout
    masks of a model in train mode (GPT-2 has dropout on by default)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = loss_fn(model, batch)
    assert out is not None
    loss_sum, n = out
    loss_sum.backward()
    return loss_sum.detach().double(), int(n), {name: p.grad.detach().double() for name, p in trainable(model)}


def reference_step(model, batch):
    with fast_paths(False):
        return step(model, batch, causal_lm_loss)


def max_rel_error(got, want):
    """Largest gradient error relative to that gradient's own scale, over all parameters."""
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp32_loss_and_adapter_grads_match_full_logits_reference(arch):
    model = lora_model(tiny_models.FACTORIES[arch]())
    batch = make_batch()
    loss, n, grads = step(model, batch, fused_causal_lm_loss)
    ref_loss, ref_n, ref_grads = reference_step(model, batch)
    assert n == ref_n == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    assert max_rel_error(grads, ref_grads) < 1e-5


def test_bf16_base_with_fp32_adapters_no_less_accurate_than_reference():
    # bf16 base weights, fp32 LoRA weights (peft's and peftkit's default for a bf16 model).
    # Both paths round activations to bf16, so both sit some bf16 ulps from the fp32 result;
    # the fused path must be as close to it as the reference path.
    base = tiny_models.llama()
    truth_model = lora_model(copy.deepcopy(base))
    model = lora_model(base.to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for _, p in trainable(model))
    batch = make_batch()
    loss, n, grads = step(model, batch, fused_causal_lm_loss)
    ref_loss, ref_n, ref_grads = reference_step(model, batch)
    true_loss, _, true_grads = reference_step(truth_model, batch)
    assert n == ref_n
    assert abs(loss - true_loss) <= 2 * abs(ref_loss - true_loss) + 2**-8 * abs(true_loss)
    assert abs(loss - true_loss) <= 2**-5 * abs(true_loss)
    fused_err, ref_err = max_rel_error(grads, true_grads), max_rel_error(ref_grads, true_grads)
    assert fused_err <= 2 * ref_err + 2**-8, (fused_err, ref_err)


def test_autocast_bf16_matches_plain_path_under_autocast():
    model = lora_model(tiny_models.llama())
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = step(model, batch, fused_causal_lm_loss)
        plain_loss, _, plain_grads = step(model, batch, causal_lm_loss)
    true_loss, _, true_grads = reference_step(model, batch)
    assert abs(loss - true_loss) <= 2 * abs(plain_loss - true_loss) + 2**-8 * abs(true_loss)
    assert max_rel_error(grads, true_grads) <= 2 * max_rel_error(plain_grads, true_grads) + 2**-8


def test_dropout_masks_unchanged_by_the_fused_loss():
    # The backbone runs the same modules in the same order, so the LoRA dropout masks (seeds
    # drawn from torch's global generator) are the same as in the full-logits path.
    model = lora_model(tiny_models.llama(), lora_dropout=0.25)
    batch = make_batch()
    loss, _, grads = step(model, batch, fused_causal_lm_loss, seed=7)
    plain_loss, _, plain_grads = step(model, batch, causal_lm_loss, seed=7)
    other_loss, _, _ = step(model, batch, causal_lm_loss, seed=8)
    assert abs(loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert abs(other_loss - plain_loss) > 1e-4 * abs(plain_loss)  # dropout is really active
    assert max_rel_error(grads, plain_grads) < 1e-5


def test_eval_without_grad():
    model = lora_model(tiny_models.llama()).eval()
    batch = make_batch()
    with torch.no_grad():
        loss, n = fused_causal_lm_loss(model, batch)
        ref_loss, ref_n = causal_lm_loss(model, batch)
    assert not loss.requires_grad and int(n) == int(ref_n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)


# --- where the fused path refuses (the caller falls back to the full logits) ----------------
class Wrapper(nn.Module):
    """Stands in for DDP / DataParallel: the model is `.module`, forward goes through the wrapper."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _scaled_logits_llama():
    """A Llama whose forward scales the logits after the head, with no config attribute
    saying so: only the probe can tell."""
    from transformers import LlamaForCausalLM

    class LogitScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    return LogitScaledLlama(tiny_models.llama().config)


def _softcapped_llama():
    base = tiny_models.llama()
    base.config.final_logit_softcapping = 30.0
    return base


def _patched_forward(model):
    model.forward = model.forward  # a bound method stored on the instance, as wrappers do
    return model


CASES = {
    "lora on lm_head": (lambda: lora_model(tiny_models.llama(), target_modules=["q_proj", "lm_head"]),
                        "not a plain nn.Linear"),
    "lm_head in modules_to_save": (lambda: lora_model(tiny_models.llama(), modules_to_save=["lm_head"]),
                                   "not a plain nn.Linear"),
    "softcapped logits": (lambda: lora_model(_softcapped_llama()), "final_logit_softcapping"),
    "logits transformed in forward": (lambda: lora_model(_scaled_logits_llama()), "transforms the lm_head output"),
    "prompt tuning": (lambda: get_peft_model(tiny_models.llama(), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                      num_virtual_tokens=3)),
                      "prompt-learning"),
    "base forward patched on the instance": (lambda: lora_model(_patched_forward(tiny_models.llama())), "patched"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refuses_what_it_cannot_split(case):
    build, reason = CASES[case]
    model = build()
    batch = make_batch()
    assert reason in (model.chunked_loss_blocker(batch) or "")
    with pytest.raises(ValueError, match="does not apply"):
        model.chunked_causal_lm_loss(batch)
    # The forward and the loop's loss fall back to the full logits.
    assert model(**batch).logits is not None
    plain_loss, plain_n = causal_lm_loss(model, batch)
    torch.manual_seed(0)
    loss, n = fast_causal_lm_loss(model, batch)
    assert int(n) == int(plain_n)


def test_refuses_without_labels_or_with_fast_paths_off():
    model = lora_model(tiny_models.llama())
    batch = make_batch()
    assert model.chunked_loss_blocker(batch) is None
    with fast_paths(False):
        assert "fast path is off" in model.chunked_loss_blocker(batch)
    with fast_paths(False, "linear_cross_entropy"):
        assert "linear_cross_entropy" in model.chunked_loss_blocker(batch)
    assert "labels" in model.chunked_loss_blocker({k: v for k, v in batch.items() if k != "labels"})
    model.chunked_loss = False
    assert "chunked_loss is False" in model.chunked_loss_blocker(batch)


def test_accelerate_autocast_wrapper_direct_call_only_under_autocast():
    # accelerate's mixed-precision prepare(): forward = autocast(original forward), and the
    # original kept as `_original_forward`. In eval the loop calls the split directly: only
    # under `accelerator.autocast()` is that the same computation.
    model = lora_model(tiny_models.llama()).eval()
    model._original_forward = model.forward
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model._original_forward)
    batch = make_batch()
    with torch.no_grad():
        loss, n = fast_causal_lm_loss(model, batch)
        plain_loss, plain_n = causal_lm_loss(model, batch)
        assert loss.item() == plain_loss.item()  # fell back to the wrapped forward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = fast_causal_lm_loss(model, batch)
    assert int(n) == int(plain_n)
    assert abs(loss.item() - plain_loss.item()) <= 2**-5 * abs(plain_loss.item())


# --- the forward: every route (Trainer, plain and Accelerate loops) gets the split ---------------
def test_train_forward_with_labels_returns_the_loss_without_logits():
    model = lora_model(tiny_models.llama(), lora_dropout=0.1)
    batch = make_batch()
    torch.manual_seed(11)
    out = model(**batch)
    assert out.logits is None
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable(model)}
    model.zero_grad(set_to_none=True)
    model.chunked_loss = False  # the documented way to keep the logits
    torch.manual_seed(11)
    full = model(**batch)
    assert full.logits.shape == (3, 11, 64)
    full.loss.backward()
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-5, atol=0)
    for name, p in trainable(model):
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model = lora_model(tiny_models.llama())
    batch = make_batch()
    loss_sum, n = model.chunked_causal_lm_loss(batch)
    out = model(**batch, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out.loss, loss_sum / 40)
    model.chunked_loss = False
    torch.testing.assert_close(model(**batch, num_items_in_batch=torch.tensor(40)).loss, loss_sum / 40,
                               rtol=1e-5, atol=0)


def test_eval_mode_and_unlabelled_calls_return_logits():
    model = lora_model(tiny_models.llama())
    batch = make_batch()
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits is not None
    model.eval()
    out = model(**batch)
    assert out.logits is not None and out.loss is not None


@pytest.mark.parametrize("kwarg", [{"return_dict": False}, {"logits_to_keep": 1},
                                   {"shift_labels": torch.zeros(3, 11, dtype=torch.long)}])
def test_forward_steps_aside_for_arguments_the_split_does_not_compute(kwarg):
    model = lora_model(tiny_models.llama())
    batch = dict(make_batch(), **kwarg)
    assert next(iter(kwarg)) in model.chunked_loss_blocker(batch)
    if "logits_to_keep" in kwarg:
        return  # transformers' own loss then fails: logits for 1 position, labels for 11
    out = model(**batch)
    logits = out[1] if isinstance(out, tuple) else out.logits
    assert logits is not None


def test_ddp_like_wrapper_goes_through_the_forward():
    # DDP keeps the model as `.module`; the loop's loss calls the wrapper, whose forward (DDP's
    # gradient hooks) runs, and the PeftModel inside computes the split.
    inner = lora_model(tiny_models.llama())
    wrapped = Wrapper(inner).train()
    batch = make_batch()
    loss, n = fast_causal_lm_loss(wrapped, batch)
    ref_loss, ref_n = causal_lm_loss(inner, batch)
    assert int(n) == int(ref_n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["t5", "bert_cls"])
def test_models_that_are_not_causal_lms_keep_their_own_loss(arch):
    # T5 turns labels into decoder inputs; a classifier's labels are classes: their forward runs.
    base = getattr(tiny_models, arch)()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q", "v"] if arch == "t5" else ["query", "value"]))
    model.train()
    batch = tiny_models.inputs_for(arch if arch == "t5" else "bert")
    batch.pop("decoder_input_ids", None)  # T5 makes them from the labels
    labels = batch["input_ids"] if arch == "t5" else torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    assert "not a decoder-only causal LM" in model.chunked_loss_blocker(dict(batch, labels=labels))
    out = model(**batch, labels=labels)
    assert out.logits is not None and torch.isfinite(out.loss)


def test_a_batch_the_probe_cannot_use_does_not_switch_the_split_off_for_good():
    # A packed batch's 4-D mask, or inputs_embeds, must not leave a cached refusal behind.
    model = lora_model(tiny_models.llama())
    batch = make_batch()
    embeds = {"inputs_embeds": model.get_input_embeddings()(batch["input_ids"]), "labels": batch["labels"]}
    assert "input_ids" in model.chunked_loss_blocker(embeds)
    mask4d = torch.ones(3, 1, 11, 11, dtype=torch.bool).tril()
    assert model.chunked_loss_blocker(dict(batch, attention_mask=mask4d)) is None
    assert model.chunked_loss_blocker(batch) is None


def test_forward_hooks_on_the_causal_lm_keep_its_own_forward():
    model = lora_model(tiny_models.llama())
    seen = []
    model.get_base_model().register_forward_hook(lambda module, args, out: seen.append(out.logits is not None))
    batch = make_batch()
    assert "forward hooks" in model.chunked_loss_blocker(batch)
    assert model(**batch).logits is not None and seen == [True]

