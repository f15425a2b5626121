"""`peftkit export ADAPTER --check vllm|sglang`: ready (exit 0) or not (exit 1, one reason a
line), and `--out` writes a folder holding only what the server reads."""

from __future__ import annotations

import json

import pytest
from export_helpers import make_adapter

from peftkit import IA3Config
from peftkit.cli import main


@pytest.fixture(scope="module")
def plain(tmp_path_factory, llama_dir):
    folder = make_adapter(llama_dir, tmp_path_factory.mktemp("plain") / "adapter", r=8, lora_alpha=16,
                          target_modules=["q_proj", "v_proj"])
    (folder / "README.md").write_text("trained on ...\n")  # what a run leaves beside the adapter
    (folder / "run_config.yaml").write_text("model: {}\n")
    return folder


def _reasons(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("not ready: ")]


def test_a_plain_lora_is_ready_and_the_clean_folder_holds_only_config_and_weights(plain, tmp_path, capsys):
    clean = tmp_path / "clean"
    assert main(["export", str(plain), "--check", "vllm", "--out", str(clean)]) == 0
    out = capsys.readouterr().out
    assert f"{plain}: ready for vLLM" in out and f"clean adapter folder written to {clean}" in out
    assert sorted(p.name for p in clean.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (clean / "adapter_model.safetensors").read_bytes() == (plain / "adapter_model.safetensors").read_bytes()
    assert json.loads((clean / "adapter_config.json").read_text()) == \
        json.loads((plain / "adapter_config.json").read_text())
    assert main(["export", str(plain), "--check", "sglang"]) == 0
    assert "ready for SGLang" in capsys.readouterr().out


def test_rank_above_the_servers_default_and_the_max_lora_rank_option(llama_dir, tmp_path, capsys):
    adapter = make_adapter(llama_dir, tmp_path / "r32", r=32, target_modules=["q_proj"], rank_pattern={"v_proj": 64})
    assert main(["export", str(adapter), "--check", "vllm", "--out", str(tmp_path / "clean")]) == 1
    out = capsys.readouterr().out
    assert _reasons(out) == [
        "not ready: r=32 is above vLLM's max_lora_rank 16 (its default; raise it with --max-lora-rank)",
        "not ready: rank_pattern['v_proj']=64 is above vLLM's max_lora_rank 16 (its default; raise it with "
        "--max-lora-rank)"]
    assert f"nothing written to {tmp_path / 'clean'}" in out and not (tmp_path / "clean").exists()
    assert main(["export", str(adapter), "--check", "vllm", "--max-lora-rank", "64"]) == 0
    assert main(["export", str(adapter), "--check", "sglang"]) == 0  # SGLang sizes buffers from its adapters
    capsys.readouterr()
    assert main(["export", str(adapter), "--check", "sglang", "--max-lora-rank", "16"]) == 1
    assert "r=32 is above SGLang's max_lora_rank 16" in capsys.readouterr().out


def test_every_reason_is_its_own_line(llama_dir, tmp_path, capsys):
    adapter = make_adapter(llama_dir, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True,
                           modules_to_save=["lm_head"], bias="all")
    assert main(["export", str(adapter), "--check", "vllm"]) == 1
    reasons = _reasons(capsys.readouterr().out)
    assert reasons[0] == "not ready: DoRA (use_dora=true): vLLM does not load DoRA; merge it (peftkit merge) instead"
    assert reasons[1].startswith("not ready: modules_to_save ['lm_head']: vLLM does not load whole-module copies")
    assert reasons[2] == "not ready: bias='all': vLLM does not load adapter bias terms"
    # the magnitude vector, the lm_head copy and every bias are tensors the server never reads
    assert reasons[3].startswith("not ready: ") and "tensor(s) other than LoRA A/B" in reasons[3]
    assert "lora_magnitude_vector" in reasons[3] and len(reasons) == 4


def test_other_methods_and_modules_a_server_does_not_adapt(llama_dir, tmp_path, capsys):
    ia3 = make_adapter(llama_dir, tmp_path / "ia3", config=IA3Config(
        task_type="CAUSAL_LM", base_model_name_or_path=llama_dir, target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"]))
    assert main(["export", str(ia3), "--check", "vllm"]) == 1
    assert _reasons(capsys.readouterr().out)[0] == "not ready: method IA3: vLLM serves LoRA adapters only"

    emb = make_adapter(llama_dir, tmp_path / "emb", r=4, target_modules=["embed_tokens", "q_proj"])
    assert main(["export", str(emb), "--check", "vllm"]) == 0
    capsys.readouterr()
    assert main(["export", str(emb), "--check", "sglang"]) == 1
    reasons = _reasons(capsys.readouterr().out)
    assert len(reasons) == 1 and reasons[0].startswith("not ready: target module(s) embed_tokens: SGLang adapts only")


def test_pissa_init_changes_the_base_so_vllm_refuses_it(plain, tmp_path, capsys):
    import shutil

    pissa = tmp_path / "pissa"
    shutil.copytree(plain, pissa)
    config = json.loads((pissa / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    (pissa / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", str(pissa), "--check", "vllm"]) == 1
    assert "not ready: init_lora_weights='pissa_niter_4': vLLM refuses inits that change the base weights" in \
        capsys.readouterr().out


def test_check_usage_errors(plain, tmp_path, capsys):
    assert main(["export", str(plain), "--check", "vllm", "--dtype", "f16"]) == 2
    assert "--dtype goes with --to, not --check" in capsys.readouterr().err
    assert main(["export", str(plain), "--check", "tgi"]) == 2
    assert main(["export", str(tmp_path / "nothing"), "--check", "vllm"]) == 1
    assert "is not a saved adapter folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert main(["export", str(plain), "--check", "vllm", "--out", str(tmp_path / "busy")]) == 1
    assert "holds other files (notes.txt)" in capsys.readouterr().err


def test_nan_weights_are_not_ready(plain, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(plain, broken)
    state = load_file(str(broken / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key][1, 2] = float("inf")
    save_file(state, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert main(["export", str(broken), "--check", "vllm"]) == 1
    assert _reasons(capsys.readouterr().out) == [
        f"not ready: non-finite values in {key} (shape (8, 64): 0 NaN, 1 Inf): the server would serve NaN outputs"]


def test_export_is_in_the_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for example in ("peftkit export out/run --to gguf --out a.gguf", "peftkit export out/run --to gguf-merged",
                    "peftkit export out/run --check vllm --out clean/"):
        assert example in text
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--to {gguf,gguf-merged}", "--check {vllm,sglang}", "--dtype {f32,f16,bf16}", "--max-lora-rank N",
                   "--out PATH", "--base MODEL"):
        assert option in text
