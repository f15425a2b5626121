"""`peftkit export --to gguf | gguf-merged`: the files read back with gguf's own reader hold
llama.cpp's names, shapes and metadata, and the adapter's / merged model's values."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from export_helpers import adapter_tensors, gguf_fields, interleave_rows, make_adapter

from peftkit import IA3Config
from peftkit.cli import main

pytest.importorskip("gguf")

PREFIX = "base_model.model.model.layers"
PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, llama_dir):
    return make_adapter(llama_dir, tmp_path_factory.mktemp("lora") / "adapter", r=4, lora_alpha=8,
                        target_modules="all-linear")


def test_adapter_gguf_has_llama_cpp_names_metadata_and_the_adapter_values(lora_dir, tmp_path, capsys):
    out = tmp_path / "adapter.gguf"
    assert main(["export", str(lora_dir), "--to", "gguf", "--out", str(out)]) == 0
    assert f"GGUF LoRA adapter written to {out} (28 tensors, f32)" in capsys.readouterr().out
    fields, tensors = gguf_fields(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    expected = {f"blk.{i}.{g}.weight.lora_{x}" for i in range(2) for g in PROJECTIONS.values() for x in "ab"}
    assert set(tensors) == expected
    saved = adapter_tensors(lora_dir)
    for i in range(2):
        for hf, g in PROJECTIONS.items():
            a_key = next(k for k in saved if k.startswith(f"{PREFIX}.{i}.") and f".{hf}.lora_A" in k)
            a, b = saved[a_key], saved[a_key.replace("lora_A", "lora_B")]
            got_a, type_a = tensors[f"blk.{i}.{g}.weight.lora_a"]
            got_b, _ = tensors[f"blk.{i}.{g}.weight.lora_b"]
            assert type_a == "F32" and got_a.shape == tuple(a.shape) and got_b.shape == tuple(b.shape)
            heads = {"q_proj": 4, "k_proj": 2}.get(hf)  # llama_dir: 4 query heads, 2 key/value heads
            want_b = interleave_rows(b, heads) if heads else b
            np.testing.assert_array_equal(got_a, a.numpy())
            np.testing.assert_array_equal(got_b, want_b.numpy())


def test_scales_other_than_alpha_over_r_are_folded_into_b(llama_dir, tmp_path):
    # llama.cpp scales every pair by alpha / r (r of that pair): rank_pattern needs nothing,
    # alpha_pattern and rsLoRA change B.
    adapter = make_adapter(llama_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"],
                           rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 2}, use_rslora=True)
    out = tmp_path / "a.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(out)]) == 0
    _, tensors = gguf_fields(out)
    saved = adapter_tensors(adapter)
    for hf, r, alpha in (("v_proj", 4, 2), ("o_proj", 2, 8)):
        b = saved[f"{PREFIX}.0.self_attn.{hf}.lora_B.weight"]
        got = tensors[f"blk.0.{PROJECTIONS[hf]}.weight.lora_b"][0]
        assert got.shape == (b.shape[0], r)
        np.testing.assert_allclose(got, (b * (alpha / r ** 0.5) / (8 / r)).numpy(), rtol=1e-6)


def test_embedding_lora_is_stored_transposed_as_llama_cpp_reads_it(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, tmp_path / "e", r=4, lora_alpha=4, target_modules=["embed_tokens"])
    out = tmp_path / "e.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(out), "--dtype", "f16"]) == 0
    _, tensors = gguf_fields(out)
    saved = adapter_tensors(adapter)
    a, b = saved["base_model.model.model.embed_tokens.lora_embedding_A"], \
        saved["base_model.model.model.embed_tokens.lora_embedding_B"]
    got_a, type_a = tensors["token_embd.weight.lora_a"]
    assert type_a == "F16" and got_a.shape == (a.shape[1], 4)
    np.testing.assert_array_equal(got_a, a.T.half().numpy())
    np.testing.assert_array_equal(tensors["token_embd.weight.lora_b"][0], b.half().numpy())


def test_what_llama_cpp_cannot_load_is_refused_each_named(llama_dir, tmp_path, capsys):
    dora = make_adapter(llama_dir, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True,
                        modules_to_save=["lm_head"], bias="lora_only")
    assert main(["export", str(dora), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "DoRA (use_dora=true)" in err and "modules_to_save ['lm_head']" in err and "bias='lora_only'" in err
    assert len([line for line in err.splitlines() if line.startswith("  - ")]) == 3
    assert not (tmp_path / "x.gguf").exists()

    ia3 = make_adapter(llama_dir, tmp_path / "ia3", config=IA3Config(
        task_type="CAUSAL_LM", base_model_name_or_path=llama_dir, target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"]))
    assert main(["export", str(ia3), "--to", "gguf", "--out", str(tmp_path / "y.gguf")]) == 1
    assert "method IA3: llama.cpp loads LoRA adapters only" in capsys.readouterr().err


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(base)
    adapter = make_adapter(str(base), tmp_path / "a", r=2, target_modules=["c_attn"])
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(tmp_path / "a.gguf")]) == 1
    assert "base architecture 'gpt2': supported llama, mistral, qwen2, qwen3" in capsys.readouterr().err
    assert main(["export", str(adapter), "--to", "gguf-merged", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "does not support model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_usage_errors(lora_dir, tmp_path, capsys):
    assert main(["export", str(lora_dir), "--to", "gguf"]) == 2
    assert "--to gguf needs --out FILE" in capsys.readouterr().err
    assert main(["export", str(lora_dir), "--to", "gguf", "--out", str(tmp_path / "a"), "--max-lora-rank", "8"]) == 2
    assert main(["export", str(lora_dir), "--to", "gguf", "--check", "vllm"]) == 2
    assert main(["export", str(lora_dir), "--to", "ggml", "--out", "x"]) == 2
    capsys.readouterr()
    assert main(["export", str(lora_dir), "--to", "gguf", "--out", str(tmp_path)]) == 1
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_without_the_gguf_package_the_error_says_how_to_install_it(lora_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["export", str(lora_dir), "--to", "gguf", "--out", str(tmp_path / "a.gguf")]) == 1
    assert "pip install 'peftkit[gguf]'" in capsys.readouterr().err


def test_merged_gguf_holds_the_merged_weights_and_the_tokenizer(lora_dir, llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import PeftModel

    out = tmp_path / "merged.gguf"
    assert main(["export", str(lora_dir), "--to", "gguf-merged", "--out", str(out)]) == 0
    assert f"GGUF merged model written to {out}" in capsys.readouterr().out
    fields, tensors = gguf_fields(out)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(lora_dir))
    state = merged.merge_and_unload().state_dict()
    assert fields["general.type"] == "model" and fields["general.file_type"] == 1  # MOSTLY_F16
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 64 and fields["llama.rope.dimension_count"] == 16
    q, q_type = tensors["blk.1.attn_q.weight"]
    assert q_type == "F16"
    np.testing.assert_array_equal(q, interleave_rows(state["model.layers.1.self_attn.q_proj.weight"], 4).half().numpy())
    down = tensors["blk.0.ffn_down.weight"][0]
    np.testing.assert_array_equal(down, state["model.layers.0.mlp.down_proj.weight"].half().numpy())
    norm, norm_type = tensors["blk.0.attn_norm.weight"]
    assert norm_type == "F32"  # norms stay f32, as llama.cpp's converter keeps them
    np.testing.assert_array_equal(norm, state["model.layers.0.input_layernorm.weight"].numpy())
    assert "output.weight" in tensors and len(tensors) == len(state)

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == [t for t, _ in vocab]
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3 and types[100] == 1  # CONTROL, NORMAL
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_merged_gguf_refuses_a_tokenizer_llama_cpp_would_split_differently(lora_dir, llama_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(lora_dir.parent / "wordlevel")
    adapter = lora_dir.parent / "with-wordlevel"
    shutil.copytree(lora_dir, adapter, dirs_exist_ok=True)
    for f in (lora_dir.parent / "wordlevel").iterdir():
        shutil.copy(f, adapter / f.name)
    assert main(["export", str(adapter), "--to", "gguf-merged", "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert "model type 'WordLevel' (not BPE)" in err and "pre-tokenizer" in err and "supported: byte-level BPE" in err
    assert not (tmp_path / "m.gguf").exists()


def test_merged_gguf_bf16_round_trips(lora_dir, llama_dir, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.gguf"
    assert main(["export", str(lora_dir), "--to", "gguf-merged", "--out", str(out), "--dtype", "bf16"]) == 0
    emb = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "token_embd.weight")
    assert emb.tensor_type.name == "BF16"
    values = gguf.quants.dequantize(emb.data, emb.tensor_type)
    want = AutoModelForCausalLM.from_pretrained(llama_dir).model.embed_tokens.weight.detach()  # not adapted
    np.testing.assert_array_equal(values, want.bfloat16().float().numpy())


def test_qwen2_keeps_row_order_and_writes_the_attention_biases(tmp_path):
    from export_helpers import save_tiny
    from transformers import AutoModelForCausalLM

    base = save_tiny("qwen2", tmp_path / "qwen2")
    adapter = make_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "k_proj"])
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(tmp_path / "a.gguf")]) == 0
    fields, tensors = gguf_fields(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "qwen2"
    b = adapter_tensors(adapter)["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_b"][0], b.numpy())  # NEOX rotary: as is

    assert main(["export", str(adapter), "--to", "gguf-merged", "--out", str(tmp_path / "m.gguf"),
                 "--dtype", "f32"]) == 0
    fields, tensors = gguf_fields(tmp_path / "m.gguf")
    bias = AutoModelForCausalLM.from_pretrained(base).model.layers[0].self_attn.k_proj.bias.detach()
    np.testing.assert_array_equal(tensors["blk.0.attn_k.bias"][0], bias.numpy())
    assert fields["qwen2.attention.head_count"] == 4 and tensors["blk.0.attn_k.bias"][1] == "F32"


def test_lm_head_lora_on_tied_embeddings_is_refused(tmp_path, capsys):
    from export_helpers import save_tiny

    base = save_tiny("mistral", tmp_path / "tied", tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "a", r=2, target_modules=["lm_head", "v_proj"])
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(tmp_path / "a.gguf")]) == 1
    assert "module lm_head: the base ties lm_head to the embeddings" in capsys.readouterr().err
