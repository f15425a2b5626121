"""peftkit.data: user data files + a tokenizer -> tokenized, masked, optionally packed datasets.

    from peftkit.data import DataConfig, prepare_datasets, preview
    data = prepare_datasets(DataConfig(path="train.jsonl", max_length=512), tokenizer, task="causal-lm")
    data.train, data.eval, data.collator, data.stats, data.format, data.label_names, data.cache_hit

task is "causal-lm", "seq-cls", "seq2seq" or "token-cls" (rows of words + one tag per word).
"""

from .collate import DataCollator, block_causal_mask, make_collator
from .config import FORMATS, OVERFLOW_POLICIES, TASKS, TRAIN_ON, DataConfig, default_cache_dir
from .errors import DataError
from .formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, alpaca_prompt
from .packing import pack_lengths
from .pipeline import DataStats, PreparedData, prepare_datasets
from .preview import PreviewReport, preview, render_example, render_tagged
from .tokenization import IGNORE_INDEX, prompt_token_ids

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "OVERFLOW_POLICIES",
    "TASKS",
    "TRAIN_ON",
    "DataCollator",
    "DataConfig",
    "DataError",
    "DataStats",
    "PreparedData",
    "PreviewReport",
    "alpaca_prompt",
    "block_causal_mask",
    "default_cache_dir",
    "make_collator",
    "pack_lengths",
    "prepare_datasets",
    "prompt_token_ids",
    "preview",
    "render_example",
    "render_tagged",
]
