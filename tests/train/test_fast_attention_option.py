"""TrainConfig.fast_attention: the loop routes the model's attention to peftkit's kernel for the
run only, and hands the model back computing as it came."""
import importlib

import pytest
import torch
from _tiny_train import lm_rows, tiny_llama

from peftkit import disable_fast_attention, enable_fast_attention, fast_attention_enabled
from peftkit.train import TrainConfig, TrainConfigError, train

attention_kernels = importlib.import_module("peftkit.kernels.attention")


@pytest.fixture
def kernel_calls(monkeypatch):
    from peftkit.kernels import _gemm

    # the kernel is taken only on CPUs with native bf16 GEMMs; here the routing is what is tested
    monkeypatch.setattr(_gemm, "_NATIVE_16BIT", {torch.bfloat16: True, torch.float16: True})
    calls = []
    fast = attention_kernels._attention_torch

    def spy(q, k, v, bias, scale):
        calls.append(tuple(q.shape))
        return fast(q, k, v, bias, scale)

    monkeypatch.setattr(attention_kernels, "_attention_torch", spy)
    return calls


def _run(folder, model, **options):
    routed_during = []
    config = TrainConfig(output_dir=str(folder), max_steps=2, micro_batch_size=4, save_every=0, progress=False,
                         precision="bf16", **options)  # CPU bf16 autocast: where the kernel applies
    train(model, lm_rows(8), config=config, on_step_end=lambda info: routed_during.append(fast_attention_enabled(model)))
    return routed_during


def test_on_by_default_for_the_run_only(tmp_path, kernel_calls):
    assert TrainConfig().fast_attention is True
    model = tiny_llama()
    assert not fast_attention_enabled(model)  # get_peft_model alone routes nothing
    assert _run(tmp_path, model) == [True, True]
    assert kernel_calls and not fast_attention_enabled(model)


def test_off_keeps_sdpa_and_a_user_choice_survives_the_run(tmp_path, kernel_calls):
    model = tiny_llama()
    enable_fast_attention(model)
    assert _run(tmp_path, model, fast_attention=False) == [False, False]
    assert kernel_calls == [] and fast_attention_enabled(model)
    disable_fast_attention(model)


def test_yaml_value_is_checked():
    assert TrainConfig.from_dict({"fast_attention": False}).fast_attention is False
    with pytest.raises(TrainConfigError, match="fast_attention='yes': expected true/false"):
        TrainConfig.from_dict({"fast_attention": "yes"})
