"""The tokenized-data cache: its key, and the small JSON record written once a run is complete.

Layout: `<cache_dir>/<key>/train.arrow`, `eval.arrow`, `meta.json`, where key is a hash of
the data sources' fingerprints, the tokenizer's, the task and every setting that changes
the tokens. `meta.json` is written last (atomically), so it existing means the entry is whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

# Bump when the tokenization or packing code changes what it produces, so old entries miss.
PIPELINE_VERSION = 1
META_FILE = "meta.json"
# DataConfig fields that change the produced tokens (paths enter through source fingerprints).
KEYED_SETTINGS = (
    "eval_split", "split", "format", "column_mapping", "max_length", "overflow",
    "train_on", "add_eos", "packing", "seed", "system_prompt", "label_all_subwords",
)  # fmt: skip


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's behaviour: name, size, template, special tokens, full model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The serialized fast tokenizer covers vocab, merges, normalizer and post-processor.
        model = backend.to_str()
    else:
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": [str(t) for t in tokenizer.all_special_tokens],
        "special_ids": {
            name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk", "sep", "cls")
        },
        "model_sha256": hashlib.sha256(model.encode("utf-8")).hexdigest(),
    }


def cache_key(
    train_fingerprints: list[Any], eval_fingerprints: list[Any], tokenizer: Any, task: str, settings: dict[str, Any]
) -> str:
    """Hex digest naming the cache folder of one (data, tokenizer, settings) combination."""
    payload = {
        "version": PIPELINE_VERSION,
        "task": task,
        "train": train_fingerprints,
        "eval": eval_fingerprints,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": {k: settings[k] for k in KEYED_SETTINGS},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def read_meta(folder: str) -> dict[str, Any] | None:
    """The entry's record, or None when the entry is missing or incomplete."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    files = [meta.get("train_file")] + ([meta["eval_file"]] if meta.get("eval_file") else [])
    if not all(f and os.path.isfile(os.path.join(folder, f)) for f in files):
        return None
    return meta


def write_meta(folder: str, meta: dict[str, Any]) -> None:
    tmp = os.path.join(folder, META_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, META_FILE))
