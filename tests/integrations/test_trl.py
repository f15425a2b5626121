"""peftkit.integrations.SFTTrainer: TRL's SFTTrainer (its fused lm-head included) on a peftkit
model trains as TRL + peft does, and its checkpoints hold only the adapter."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
import peft  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cli.cli_helpers import CHAT_ROWS, build_chat_tokenizer  # noqa: E402
from peftkit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.checkpoint import read_safetensors  # noqa: E402
from peftkit.integrations import SFTTrainer  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer()


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))


def sft_args(out, **kwargs):
    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_steps=2, report_to=[], seed=0, use_cpu=True, max_length=64,
                    dataloader_num_workers=0)
    settings.update(kwargs)
    return trl.SFTConfig(**settings)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_trains_like_trl_with_peft_and_saves_only_the_adapter(tmp_path, tokenizer, chunk_rows, monkeypatch):
    """chunk_rows: TRL's fused lm-head scores the tokens in chunks peftkit sizes by memory (a
    single chunk at this size; 3 tokens per chunk forces many): the same losses either way."""
    from trl.trainer import utils as trl_utils

    import peftkit.integrations.trl as peftkit_trl

    data = Dataset.from_list(CHAT_ROWS)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    # peft's run, from an adapter with non-zero B (so every step's loss depends on both factors)
    oracle = peft.get_peft_model(tiny_llama(tokenizer), peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    oracle.save_pretrained(tmp_path / "init")
    peft_trainer = trl.SFTTrainer(model=oracle, args=sft_args(tmp_path / "peft"), train_dataset=data,
                                  processing_class=tokenizer)
    peft_trainer.train()

    chunks = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda *args: chunks.append(args[5]) or apply(*args))
    if chunk_rows is not None:
        monkeypatch.setattr(peftkit_trl, "auto_chunk_rows", lambda vocab, rows: chunk_rows)
    model = PeftModel.from_pretrained(tiny_llama(tokenizer), str(tmp_path / "init"), is_trainable=True)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path / "peftkit"), train_dataset=data,
                         processing_class=tokenizer)
    # TRL's fused lm-head sits on the transformers model inside the wrapper, as TRL puts it for peft
    assert "forward" in vars(model.get_base_model()) and "forward" not in vars(model)
    trainer.train()

    want, got = losses(peft_trainer), losses(trainer)
    assert len(got) == len(want) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-4, atol=0)
    assert got[-1] < got[0]
    assert any("mean_token_accuracy" in h for h in trainer.state.log_history)  # TRL's fused metrics ran
    assert chunks and 32768 not in chunks and (chunk_rows is None or set(chunks) == {chunk_rows})
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 32768  # TRL's own setting is back after each call

    checkpoint = tmp_path / "peftkit" / f"checkpoint-{STEPS}"
    names = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    saved = read_safetensors(str(checkpoint / "adapter_model.safetensors"))
    trained = model.adapter_state_dict()
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    # (the trained model itself now runs under accelerate's bf16 autocast wrapper: compare reloads)
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(tokenizer), str(checkpoint))
    in_peftkit = PeftModel.from_pretrained(tiny_llama(tokenizer), str(checkpoint))
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, in_peftkit(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_matches_a_straight_run(tmp_path, tokenizer):
    data = Dataset.from_list(CHAT_ROWS)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    straight = SFTTrainer(model=get_peft_model(tiny_llama(tokenizer), config), args=sft_args(tmp_path / "a"),
                          train_dataset=data, processing_class=tokenizer)
    straight.train()
    resumed = SFTTrainer(model=get_peft_model(tiny_llama(tokenizer), config), args=sft_args(tmp_path / "a"),
                         train_dataset=data, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    torch.testing.assert_close(torch.tensor(losses(resumed)[-2:]), torch.tensor(losses(straight)[-2:]),
                               rtol=1e-5, atol=0)


def test_refuses_peft_config_and_plain_models(tmp_path, tokenizer):
    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="peft_config"):
        SFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_list(CHAT_ROWS),
                   processing_class=tokenizer, peft_config=peft.LoraConfig(r=4))
    with pytest.raises(TypeError, match="get_peft_model"):
        SFTTrainer(model=tiny_llama(tokenizer), args=sft_args(tmp_path), train_dataset=Dataset.from_list(CHAT_ROWS),
                   processing_class=tokenizer)
