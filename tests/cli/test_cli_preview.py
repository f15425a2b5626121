"""`peftkit preview`: rendered examples with trained tokens marked; failures exit non-zero."""

from __future__ import annotations

from cli_helpers import build_chat_tokenizer, causal_config, cls_config, write_jsonl

from peftkit.cli import main


def test_preview_marks_the_assistant_turns(tmp_path, llama_dir, capsys):
    config = causal_config(tmp_path, llama_dir, "messages")
    assert main(["preview", config, "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2
    # Only the reply (with its end-of-turn marker and the appended EOS) is trained.
    assert "<|im_start|>user\nHello there 0<|im_end|>\n<|im_start|>assistant\n[[I am fine, thank you!<|im_end|>" in out
    assert out.rstrip().endswith("<|endoftext|>]]")
    assert "problem:" not in out


def test_preview_fails_when_an_example_has_no_trained_token(tmp_path, llama_dir, capsys):
    config = causal_config(tmp_path, llama_dir, "prompt_completion")
    assert main(["preview", config, "data.max_length=6", "-n", "1"]) == 1
    captured = capsys.readouterr()
    assert "problem: train example 1 has no trained token, so it teaches nothing" in captured.out
    assert "problem: 8 of 8 train rows have no trained token" in captured.out
    assert "preview failed: 2 problem(s)" in captured.err
    # Training on such data is refused too, with the same advice.
    assert main(["train", config, "data.max_length=6"]) == 2
    assert "none of the 8 training rows has a trained token" in capsys.readouterr().err


def test_preview_warns_when_pad_is_eos(tmp_path, llama_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    tokenizer = build_chat_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model)
    config = causal_config(tmp_path, str(model), "text")
    # peftkit's collator pads labels with -100 itself, so a shared pad/EOS id masks nothing: a warning only.
    assert main(["preview", config, "-n", "1"]) == 0
    out = capsys.readouterr().out
    eos = tokenizer.eos_token_id
    assert f"warning: pad_token_id == eos_token_id ({eos})" in out and "problem:" not in out


def test_preview_of_classification_rows_and_eval_split(tmp_path, bert_dir, capsys):
    assert main(["preview", cls_config(tmp_path, bert_dir), "--split", "eval", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[CLS] great movie, loved it [SEP]\n=> label pos" in out


def test_preview_of_a_malformed_file_names_the_line(tmp_path, llama_dir, capsys):
    config = causal_config(tmp_path, llama_dir, "text")
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"text": "ok"', '{"text": "x"}'])
    assert main(["preview", config, f"data.path={bad}"]) == 2
    err = capsys.readouterr().err
    assert bad in err and "line 2" in err
