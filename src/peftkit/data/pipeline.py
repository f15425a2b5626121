"""`prepare_datasets`: data settings + tokenizer -> cached, tokenized train/eval datasets."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from .cache import cache_key, read_meta, write_meta
from .classes import class_names
from .collate import DataCollator, make_collator
from .config import TASKS, DataConfig
from .errors import DataError, RowError
from .loading import LoadedSource, Source, load_source, quiet_progress, resolve_sources
from .packing import pack_dataset
from .tokenization import RowTokenizer

logger = logging.getLogger("peftkit.data")

SPLITS = ("train", "eval")
_HELPER_COLUMNS = ("_split", "_dropped", "_truncated", "_tokens", "_trained")


@dataclass
class DataStats:
    """Counts for one split. Tokens are input tokens; trained tokens carry a label (0 for seq-cls;
    for token-cls the labelled sub-words, normally one per word)."""

    rows_read: int = 0
    rows_dropped: int = 0
    rows_truncated: int = 0
    rows_without_trained_tokens: int = 0
    examples: int = 0  # rows kept
    sequences: int = 0  # dataset rows: examples, or packed sequences
    total_tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class PreparedData:
    """Tokenized datasets ready for a trainer.

    train / eval: `datasets.Dataset` with input_ids and labels (a class index for seq-cls, one
    per token with -100 for causal-lm and token-cls),
    plus position_ids when packed; `collator` turns a list of their rows into a batch.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    task: str
    format: str
    stats: DataStats
    eval_stats: DataStats | None
    label_names: list[str] | None
    packed: bool
    max_length: int
    add_eos: bool
    cache_hit: bool
    cache_path: str
    collator: DataCollator

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names is not None else None

    @property
    def id2label(self) -> dict[int, str] | None:
        return dict(enumerate(self.label_names)) if self.label_names is not None else None

    @property
    def label2id(self) -> dict[str, int] | None:
        return {name: i for i, name in enumerate(self.label_names)} if self.label_names is not None else None

    def summary(self) -> str:
        """A few lines for a log: format, counts per split, cache."""
        lines = [f"data: task {self.task}, format {self.format}" + (", packed" if self.packed else "")]
        for name, stats in (("train", self.stats), ("eval", self.eval_stats)):
            if stats is None:
                continue
            s = stats
            # What the loss is on: tokens (causal-lm, seq2seq; token-cls: the tagged sub-words),
            # or one class per row (seq-cls, where no token is trained).
            trained = (f"{s.examples} labelled rows, one class each" if self.task == "seq-cls"
                       else f"{s.trained_tokens} trained")
            lines.append(
                f"  {name}: {s.rows_read} rows read, {s.rows_dropped} dropped, {s.rows_truncated} truncated, "
                f"{s.examples} examples in {s.sequences} sequences, "
                f"{s.total_tokens} tokens ({trained})"
                + (f", {s.rows_without_trained_tokens} with no trained token" if s.rows_without_trained_tokens else "")
            )
        if self.label_names is not None:
            lines.append(f"  labels ({len(self.label_names)}): {self.label_names}")
        lines.append(f"  cache: {'hit' if self.cache_hit else 'written'} at {self.cache_path}")
        return "\n".join(lines)


def prepare_datasets(
    config: DataConfig, tokenizer: Any, task: str = "causal-lm", *, packed_attention: str = "mask"
) -> PreparedData:
    """Load, check, tokenize (cached), split and pack the configured data.

    task: "causal-lm", "seq-cls", "seq2seq" or "token-cls". packed_attention: see `collate.DataCollator`.
    Raises `DataError` naming the file and line (or row) of any malformed row.
    """
    _check_settings(config, task)
    collator = make_collator(tokenizer, task, packed_attention=packed_attention)
    train_sources = resolve_sources(config.paths(), config.split, is_eval=False)
    eval_sources = resolve_sources(config.eval_paths(), config.split, is_eval=True)
    key = cache_key(
        [s.fingerprint() for s in train_sources], [s.fingerprint() for s in eval_sources],
        tokenizer, task, config.to_dict(),
    )  # fmt: skip
    folder = os.path.join(config.resolved_cache_dir(), key)
    meta = read_meta(folder)
    if meta is None:
        meta = _build(config, tokenizer, task, train_sources, eval_sources, folder, key)
        hit = False
    else:
        hit = True
    result = PreparedData(
        train=datasets.Dataset.from_file(os.path.join(folder, meta["train_file"])),
        eval=datasets.Dataset.from_file(os.path.join(folder, meta["eval_file"])) if meta["eval_file"] else None,
        task=task,
        format=meta["format"],
        stats=DataStats(**meta["stats"]["train"]),
        eval_stats=DataStats(**meta["stats"]["eval"]) if meta["stats"].get("eval") else None,
        label_names=meta["label_names"],
        packed=meta["packed"],
        max_length=config.max_length,
        add_eos=config.add_eos and task in ("causal-lm", "seq2seq"),
        cache_hit=hit,
        cache_path=folder,
        collator=collator,
    )
    logger.info(result.summary())
    return result


def _check_settings(config: DataConfig, task: str) -> None:
    problems = config.problems()
    if task not in TASKS:
        problems.append(f"task {task!r} is not accepted; accepted: {', '.join(TASKS)}")
    elif task != "causal-lm":
        if config.packing:
            problems.append(f"data.packing: packing is only for task 'causal-lm', not {task!r}; set packing: false")
        if config.train_on != "completion":
            problems.append(
                f"data.train_on: {config.train_on!r} only applies to task 'causal-lm'; remove it for {task!r}"
            )
    if config.label_all_subwords is True and task != "token-cls":
        problems.append(f"data.label_all_subwords: only applies to task 'token-cls'; remove it for {task!r}")
    if config.system_prompt and config.format not in ("auto", "messages", "alpaca"):
        problems.append(f"data.system_prompt: only the messages and alpaca formats use it, not {config.format!r}")
    if problems:
        raise DataError("invalid data settings:\n  " + "\n  ".join(problems))


def _build(
    config: DataConfig,
    tokenizer: Any,
    task: str,
    train_sources: list[Source],
    eval_sources: list[Source],
    folder: str,
    key: str,
) -> dict[str, Any]:
    raw_cache = os.path.join(config.resolved_cache_dir(), "raw")
    load = lambda s: load_source(s, config.column_mapping, task, config.format, raw_cache)  # noqa: E731
    train_loaded = [load(s) for s in train_sources]
    eval_loaded = [load(s) for s in eval_sources]
    fmt = _common_format(train_loaded + eval_loaded)
    if config.system_prompt and fmt not in ("messages", "alpaca"):
        raise DataError(f"data.system_prompt: only the messages and alpaca formats use it; the data is {fmt!r}")
    _check_mapping_used(config.column_mapping, train_loaded + eval_loaded)
    label_names, label_index = None, None
    if fmt == "classification":
        label_names, label_index = class_names(train_loaded, "label")
    elif fmt == "token_classification":
        label_names, label_index = class_names(train_loaded, "tags")
    row_tokenizer = RowTokenizer(
        tokenizer, task, fmt,
        max_length=config.max_length, overflow=config.overflow, train_on=config.train_on,
        add_eos=config.add_eos, system_prompt=config.system_prompt, label_index=label_index,
        label_all_subwords=config.label_all_subwords,
    )  # fmt: skip

    os.makedirs(folder, exist_ok=True)
    holdout = _holdout(train_loaded, config) if not eval_loaded else None
    parts, offset = [], 0
    for k, loaded in enumerate(train_loaded):
        split_of = (lambda i, o=offset: int(holdout[o + i])) if holdout is not None else (lambda i: 0)
        target = os.path.join(folder, f"tok-train-{k}.arrow")
        parts.append(_tokenize(loaded, row_tokenizer, task, split_of, target, f"{key}-t{k}"))
        offset += len(loaded.dataset)
    for k, loaded in enumerate(eval_loaded):
        target = os.path.join(folder, f"tok-eval-{k}.arrow")
        parts.append(_tokenize(loaded, row_tokenizer, task, lambda i: 1, target, f"{key}-e{k}"))
    tokenized = datasets.concatenate_datasets(parts)
    columns = {name: tokenized.data.column(name).to_numpy() for name in _HELPER_COLUMNS}

    stats: dict[str, dict[str, int] | None] = {}
    files: dict[str, str | None] = {}
    for split_id, name in enumerate(SPLITS):
        selected = columns["_split"] == split_id
        if name == "eval" and not selected.any():
            stats[name], files[name] = None, None
            continue
        kept = selected & ~columns["_dropped"]
        if not kept.any():
            raise DataError(
                f"no {name} rows are left: all {int(selected.sum())} were longer than data.max_length="
                f"{config.max_length} and data.overflow is 'drop'"
            )
        indices = np.nonzero(kept)[0]
        rows = tokenized.select(indices).select_columns(["input_ids", "labels"])
        files[name] = f"{name}.arrow"
        target = os.path.join(folder, files[name])
        if config.packing:
            final = pack_dataset(rows, columns["_tokens"][indices], config.max_length, target, f"{key}-p{split_id}")
        else:
            with quiet_progress():
                final = rows.flatten_indices(cache_file_name=target, new_fingerprint=f"{key}-f{split_id}")
        stats[name] = DataStats(
            rows_read=int(selected.sum()),
            rows_dropped=int((selected & columns["_dropped"]).sum()),
            rows_truncated=int((kept & columns["_truncated"]).sum()),
            rows_without_trained_tokens=int((kept & (columns["_trained"] == 0)).sum()) if task != "seq-cls" else 0,
            examples=int(kept.sum()),
            sequences=len(final),
            total_tokens=int(columns["_tokens"][kept].sum()),
            trained_tokens=int(columns["_trained"][kept].sum()),
        ).as_dict()
        del final, rows
    del tokenized, parts
    for name in os.listdir(folder):
        if name.startswith("tok-"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:  # still memory-mapped on some platforms; harmless leftover
                pass
    meta = {
        "format": fmt,
        "task": task,
        "packed": config.packing,
        "label_names": label_names,
        "stats": stats,
        "train_file": files["train"],
        "eval_file": files["eval"],
    }
    write_meta(folder, meta)
    return meta


def _tokenize(
    loaded: LoadedSource, row_tokenizer: RowTokenizer, task: str, split_of: Any, cache_file: str, fingerprint: str
) -> datasets.Dataset:
    """Map one source to tokenized rows plus the helper columns the stats are computed from."""
    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{column: values[j] for column, values in batch.items()} for j in range(len(indices))]
        out: dict[str, list] = {name: [] for name in ("input_ids", "labels") + _HELPER_COLUMNS}
        for index, result in zip(indices, row_tokenizer.tokenize_batch(rows)):
            if isinstance(result, RowError):
                raise DataError(f"{loaded.locate(index)}: {result}") from None
            out["input_ids"].append(result.input_ids)
            out["labels"].append(result.labels)
            out["_split"].append(split_of(index))
            out["_dropped"].append(result.dropped)
            out["_truncated"].append(result.truncated)
            out["_tokens"].append(len(result.input_ids))
            out["_trained"].append(len(result.labels) if task == "seq2seq" else result.trained_tokens)
        return out

    int_list = datasets.List(datasets.Value("int32"))
    features = datasets.Features(
        {
            "input_ids": int_list,
            "labels": datasets.Value("int64") if task == "seq-cls" else int_list,
            "_split": datasets.Value("int8"),
            "_dropped": datasets.Value("bool"),
            "_truncated": datasets.Value("bool"),
            "_tokens": datasets.Value("int32"),
            "_trained": datasets.Value("int32"),
        }
    )
    return loaded.dataset.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=loaded.dataset.column_names,
        features=features,
        cache_file_name=cache_file,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {os.path.basename(loaded.source.path)}",
    )


def _common_format(loaded: list[LoadedSource]) -> str:
    formats = {item.format for item in loaded}
    if len(formats) > 1:
        listing = ", ".join(f"{item.source.path}: {item.format}" for item in loaded)
        raise DataError(f"data sources have different row formats ({listing}); use one format, or set data.format")
    return formats.pop()


def _check_mapping_used(mapping: dict[str, str], loaded: list[LoadedSource]) -> None:
    """A column_mapping key found in no source is most likely a typo; say so instead of ignoring it."""
    found: set[str] = set()
    for item in loaded:
        found.update(item.raw_columns)
    unused = [src for src in mapping if src not in found]
    if unused:
        raise DataError(
            f"data.column_mapping: column(s) {unused} are not in any data source (columns found: {sorted(found)})"
        )


def _holdout(train_loaded: list[LoadedSource], config: DataConfig) -> np.ndarray | None:
    """Boolean per training row (in source order): held out for eval, seeded by config.seed."""
    if config.eval_split <= 0:
        return None
    total = sum(len(item.dataset) for item in train_loaded)
    count = int(round(total * config.eval_split))
    if count < 1 or count >= total:
        raise DataError(
            f"data.eval_split={config.eval_split} of {total} training rows holds out {count}; "
            "it must leave at least one eval and one training row"
        )
    held = np.zeros(total, dtype=bool)
    held[np.random.default_rng(config.seed).permutation(total)[:count]] = True
    return held
