"""Helpers of the CLI tests: a tiny ChatML tokenizer, sample rows per format, run-config writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName a color.\n\n### Input:\nsky\n\n### Response:\nBlue",
    "user\nHello there, how are you today?\nassistant\nI am fine, thank you very much!",
    "What is the capital of France? Paris is the capital of France.",
    "one two three four five six seven eight nine ten",
]

TEXT_ROWS = [{"text": f"one two three {w} is the word number {i}."} for i, w in enumerate(
    ["four", "five", "six", "seven", "eight", "nine", "ten", "fox", "dog", "sky"])]
PC_ROWS = [{"prompt": f"What is the capital of France? ({i})", "completion": " Paris is the capital."}
           for i in range(10)]
ALPACA_ROWS = [{"instruction": "Name a color.", "input": "sky" if i % 2 else "", "output": f"Blue {i}"}
               for i in range(10)]
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Hello there {i}"},
                           {"role": "assistant", "content": "I am fine, thank you!"}]} for i in range(10)]
CLS_ROWS = [{"text": t, "label": lab} for t, lab in [
    ("great movie, loved it", "pos"), ("awful film, hated it", "neg"), ("a fine and great day", "pos"),
    ("terrible and awful", "neg"), ("loved the great cast", "pos"), ("hated the awful plot", "neg"),
    ("great great great", "pos"), ("awful awful awful", "neg")]]
ROWS = {"text": TEXT_ROWS, "prompt_completion": PC_ROWS, "alpaca": ALPACA_ROWS, "messages": CHAT_ROWS}


def build_chat_tokenizer():
    """A byte-level BPE trained here (~300 tokens), BOS added, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                        pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def write_jsonl(path: Path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def write_config(path: Path, sections: dict) -> str:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return str(path)


def causal_config(tmp_path: Path, model_dir: str, fmt: str = "messages", **train) -> str:
    """A small causal-LM run config (LoRA r=4 on all linear layers, a few steps) written to tmp."""
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", ROWS[fmt])
    settings = {"output_dir": str(tmp_path / "run"), "max_steps": 3, "micro_batch_size": 4, "lr": 1e-2,
                "save_every": 0, "log_every": 1, "progress": False, "seed": 0}
    settings.update(train)
    return write_config(tmp_path / "run.yaml", {
        "model": {"path": model_dir, "task": "causal-lm"},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"path": data, "eval_split": 0.2, "max_length": 128},
        "train": settings,
    })


def cls_config(tmp_path: Path, model_dir: str, **train) -> str:
    data = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    settings = {"output_dir": str(tmp_path / "run"), "max_steps": 4, "micro_batch_size": 4, "lr": 1e-2,
                "save_every": 0, "log_every": 1, "progress": False, "seed": 0}
    settings.update(train)
    return write_config(tmp_path / "cls.yaml", {
        "model": {"path": model_dir, "task": "seq-cls"},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"path": data, "eval_path": data, "max_length": 32},
        "train": settings,
    })


def read_metrics(folder) -> list[dict]:
    return [json.loads(line) for line in Path(folder, "metrics.jsonl").read_text().splitlines()]
