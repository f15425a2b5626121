"""Finding and loading data sources with `datasets`, with every row traceable to its file and line.

JSON and JSON Lines files are read once here in Python before `datasets` loads them, so
that bad JSON, a row of the wrong shape or mixed label types is reported with its line
number (Arrow's own errors name neither).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import datasets

from .errors import DataError
from .formats import (
    detect_format,
    format_columns,
    row_problem,
    tag_kind,
    with_tag_alias,
)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("validation", "test")
# Rows read to detect a JSON file's format (union of their keys), so that one row missing an
# optional column does not decide it.
_DETECT_ROWS = 1000
_KIND = {str: "a class name (string)", int: "a class index (integer)"}
_TAG_KIND = {str: "tag names (strings)", int: "class indices (integers)"}


@dataclass
class Source:
    """One place rows come from: a local file, a `save_to_disk` folder, or a hub dataset id."""

    path: str
    kind: str  # "file" | "disk" | "hub"
    split: str  # the split read from a hub id or a saved DatasetDict (train sources)
    is_eval: bool = False  # eval sources read "validation", else "test", from a DatasetDict
    dataset: datasets.Dataset | None = None  # hub sources are loaded when fingerprinted

    def fingerprint(self) -> list[Any]:
        """What identifies the source's content: (path, size, mtime) of its files, or the dataset fingerprint."""
        if self.kind == "hub":
            return ["hub", self.path, self.split_label(), self._hub_dataset()._fingerprint]
        files = [self.path]
        if self.kind == "disk":
            # datasets may later write its own cache-*.arrow files next to the data; they are not data.
            files = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(self.path)
                for name in names
                if not name.startswith(("cache-", "tmp"))
            )
        out: list[Any] = [self.kind, os.path.abspath(self.path), self.split_label()]
        for name in files:
            stat = os.stat(name)
            relative = os.path.relpath(name, self.path) if self.kind == "disk" else ""
            out.append([relative, stat.st_size, stat.st_mtime_ns])
        return out

    def split_label(self) -> str:
        return "validation|test" if self.is_eval else self.split

    def _hub_dataset(self) -> datasets.Dataset:
        if self.dataset is None:
            try:
                loaded = datasets.load_dataset(self.path, split=None if self.is_eval else self.split)
            except Exception as exc:  # datasets raises many types for "not found" / offline
                raise DataError(
                    f"{self.path!r} is not a local file or folder, and loading it as a Hugging Face hub dataset "
                    f"(split {self.split_label()!r}) failed: {type(exc).__name__}: {exc}"
                ) from exc
            self.dataset = _pick_split(loaded, self)
        return self.dataset


@dataclass
class LoadedSource:
    """A source's rows, renamed to canonical columns and checked against one format."""

    source: Source
    dataset: datasets.Dataset
    format: str
    raw_columns: list[str]  # before column_mapping
    line_numbers: list[int] | None = field(default=None, repr=False)

    def locate(self, index: int) -> str:
        """Where row `index` (0-based) of this source is, for error messages."""
        if self.line_numbers is not None:
            return f"{self.source.path}, line {self.line_numbers[index]}"
        if self.source.kind == "hub":
            return f"{self.source.path} (split {self.source.split_label()!r}), row {index + 1}"
        return f"{self.source.path}, row {index + 1}"


def resolve_sources(paths: list[str], split: str, is_eval: bool) -> list[Source]:
    """Expand each configured path into sources (a plain folder into its data files, sorted)."""
    out: list[Source] = []
    for path in paths:
        if os.path.isfile(path):
            _check_extension(path)
            out.append(Source(path, "file", split))
        elif os.path.isdir(path):
            if _is_saved_dataset(path):
                out.append(Source(path, "disk", split))
                continue
            files = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if os.path.splitext(name)[1].lower() in FILE_BUILDERS
            )
            if not files:
                raise DataError(
                    f"{path}: folder has no {'/'.join(FILE_BUILDERS)} files and was not written by "
                    "datasets' save_to_disk (no dataset_info.json / dataset_dict.json)"
                )
            out += [Source(f, "file", split) for f in files]
        elif _looks_like_local_path(path):
            raise DataError(f"{path}: no such file or folder")
        else:
            out.append(Source(path, "hub", split))
    for source in out:
        source.is_eval = is_eval
    return out


def load_source(
    source: Source, column_mapping: dict[str, str], task: str, requested_format: str, raw_cache_dir: str
) -> LoadedSource:
    """Load one source with `datasets`, rename columns, detect and check its format."""
    line_numbers = None
    if source.kind == "file" and FILE_BUILDERS[_extension(source.path)] == "json":
        # Every row was checked against the format detected from the first rows; keep that
        # format even if a later row brings extra columns.
        requested_format, line_numbers = _check_json_rows(source.path, column_mapping, task, requested_format)
    dataset = _load(source, raw_cache_dir)
    if line_numbers is not None and len(line_numbers) != len(dataset):
        raise DataError(
            f"{source.path}: read {len(line_numbers)} JSON rows but datasets loaded {len(dataset)}; "
            "check the file is JSON Lines or one JSON array of objects"
        )
    raw_columns = list(dataset.column_names)
    dataset = _rename(dataset, with_tag_alias(column_mapping, raw_columns, task), source.path)
    fmt = detect_format(dataset.column_names, task, requested_format, source.path)
    keep = [c for c in format_columns(fmt) if c in dataset.column_names]
    dataset = dataset.select_columns(keep)
    return LoadedSource(source, dataset, fmt, raw_columns, line_numbers)


def _load(source: Source, raw_cache_dir: str) -> datasets.Dataset:
    if source.kind == "hub":
        return source._hub_dataset()
    if source.kind == "disk":
        try:
            loaded = datasets.load_from_disk(source.path)
        except Exception as exc:
            raise DataError(f"{source.path}: could not load the saved dataset: {exc}") from exc
        return _pick_split(loaded, source)
    builder = FILE_BUILDERS[_extension(source.path)]
    if builder == "csv":  # checked first: datasets' CSV reader logs a traceback of its own for bad bytes
        problem = not_utf8_error(source.path)
        if problem is not None:
            raise problem
    try:
        with quiet_progress():
            return datasets.load_dataset(builder, data_files=source.path, split="train", cache_dir=raw_cache_dir)
    except Exception as exc:  # pandas/arrow parse errors carry the detail; the file name is ours to add
        raise DataError(f"{source.path}: could not be read as {builder.upper()}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No `datasets` progress bar inside (its bookkeeping steps: "Generating train split",
    "Flattening the indices"); the bar of the tokenization, the long step, stays."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, source: Source) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    names = list(loaded.keys())
    wanted = list(EVAL_SPLIT_NAMES) if source.is_eval else [source.split]
    for name in wanted:
        if name in loaded:
            return loaded[name]
    raise DataError(
        f"{source.path}: has splits {names}, none of them {' or '.join(repr(w) for w in wanted)}; "
        + ("an eval source needs a 'validation' or 'test' split" if source.is_eval else "set data.split to one of them")
    )


def _rename(dataset: datasets.Dataset, mapping: dict[str, str], where: str) -> datasets.Dataset:
    renames = {src: dst for src, dst in mapping.items() if src in dataset.column_names and src != dst}
    for src, dst in renames.items():
        if dst in dataset.column_names and dst not in renames:
            raise DataError(
                f"{where}: data.column_mapping maps {src!r} to {dst!r}, but the data already has a {dst!r} column; "
                f"map or remove one of them"
            )
    return dataset.rename_columns(renames) if renames else dataset


def _check_json_rows(path: str, mapping: dict[str, str], task: str, requested_format: str) -> tuple[str, list[int]]:
    """Validate every row of a JSON / JSON Lines file; returns its format and each row's 1-based line."""
    keys: list[str] = []
    for count, (_, row) in enumerate(_iter_json_rows(path)):
        if count >= _DETECT_ROWS:
            break
        keys += [k for k in row if k not in keys]
    mapping = with_tag_alias(mapping, keys, task)
    keys = [mapping.get(k, k) for k in keys]
    fmt = detect_format(keys, task, requested_format, path)
    lines: list[int] = []
    label_kind: tuple[type, int] | None = None
    for line, row in _iter_json_rows(path):
        row = {mapping.get(k, k): v for k, v in row.items()}
        problem = row_problem(row, fmt)
        if problem:
            raise DataError(f"{path}, line {line}: {problem}")
        # Labels must be names throughout or indices throughout (a file mixing them is ambiguous).
        kind = None
        if fmt == "classification":
            kind, what, kinds = tag_kind(row["label"]), f"label {row['label']!r} is", _KIND
        elif fmt == "token_classification" and row["tags"]:
            kind, what, kinds = tag_kind(row["tags"][0]), "tags are", _TAG_KIND
        if kind is not None:
            if label_kind is None:
                label_kind = (kind, line)
            elif kind is not label_kind[0]:
                raise DataError(
                    f"{path}, line {line}: {what} {kinds[kind]} but line {label_kind[1]} has "
                    f"{kinds[label_kind[0]]}; use names or class indices throughout"
                )
        lines.append(line)
    if not lines:
        raise DataError(f"{path}: has no rows")
    return fmt, lines


def _iter_json_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each row of a JSON Lines file or a JSON array file."""
    try:
        yield from _iter_json_rows_utf8(path)
    except UnicodeDecodeError:
        raise not_utf8_error(path) or DataError(f"{path}: not valid UTF-8; data files must be UTF-8") from None


def not_utf8_error(path: str) -> DataError | None:
    """A DataError naming the line and byte offset of the first bytes of `path` that are not
    UTF-8; None when the whole file decodes."""
    offset = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = line[exc.start:exc.end].hex(" ")
                return DataError(
                    f"{path}, line {line_number} (byte {offset + exc.start} of the file, column {exc.start + 1}): "
                    f"not valid UTF-8 (bytes {bad}: {exc.reason}); data files must be UTF-8: re-save it as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)"
                )
            offset += len(line)
    return None


def _iter_json_rows_utf8(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        first = ""
        for first in iter(lambda: handle.read(1), ""):
            if not first.isspace():
                break
    if first == "[" and _extension(path) == ".json":
        yield from _iter_json_array(path)
        return
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            yield line_number, _as_object(row, path, line_number)


def _iter_json_array(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p].isspace():
            p += 1
        return p

    def fail(p: int, what: str) -> DataError:
        return DataError(f"{path}, line {text.count(chr(10), 0, p) + 1}: invalid JSON: {what}")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip(pos)
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        yield line, _as_object(row, path, line)
        pos = skip(end)
        if pos >= len(text):
            raise fail(pos, "the array is not closed with ']'")
        if text[pos] == "]":
            if skip(pos + 1) < len(text):
                raise fail(skip(pos + 1), "extra data after the closing ']'")
            return
        if text[pos] != ",":
            raise fail(pos, f"expected ',' or ']' between array items, found {text[pos]!r}")
        pos += 1


def _as_object(row: Any, path: str, line: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{path}, line {line}: expected a JSON object (one row), found a {type(row).__name__}")
    return row


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_extension(path: str) -> None:
    if _extension(path) not in FILE_BUILDERS:
        raise DataError(
            f"{path}: unsupported file type {_extension(path) or '(no extension)'!r}; "
            f"accepted: {', '.join(FILE_BUILDERS)}"
        )


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _looks_like_local_path(path: str) -> bool:
    """A path that cannot be a hub id ("user/name" or "name") — so a typo is not sent to the hub."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.path.splitext(path)[1].lower() in FILE_BUILDERS
        or os.sep == "\\" and "\\" in path
    )

