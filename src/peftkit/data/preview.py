"""`peftkit preview`: show tokenized examples with the trained tokens marked, and check them.

Checks (problems fail the preview; warnings are printed):
- an example with no trained token (also counted over the whole split from the stats);
- a causal-LM example that ends without EOS, or whose EOS is not trained (when add_eos is on);
- pad_token_id == eos_token_id: always a warning, and a problem if the collator in use
  turns a trained EOS label into -100 (collators that mask labels by pad id do this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import DataError
from .tokenization import IGNORE_INDEX

MARKERS = {"brackets": ("[[", "]]"), "color": ("\x1b[32m", "\x1b[0m")}


@dataclass
class PreviewReport:
    """Rendered examples plus what is wrong (problems) or suspicious (warnings)."""

    examples: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        parts = [f"--- example {i + 1} ---\n{example}" for i, example in enumerate(self.examples)]
        parts += [f"warning: {w}" for w in self.warnings]
        parts += [f"problem: {p}" for p in self.problems]
        return "\n".join(parts)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise DataError("data preview found problems:\n  " + "\n  ".join(self.problems))


def render_example(
    tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], style: str = "brackets"
) -> str:
    """The decoded text with each run of trained tokens (label != -100) wrapped in markers."""
    if style not in MARKERS:
        raise DataError(f"preview style {style!r} is not accepted; accepted: {', '.join(MARKERS)}")
    start, end = MARKERS[style]
    out, run, run_trained = [], [], None
    for token, label in zip(list(input_ids) + [None], list(labels) + [None]):
        trained = label is not None and label != IGNORE_INDEX
        if token is None or (run and trained != run_trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{start}{text}{end}" if run_trained else text)
            run = []
        if token is not None:
            run.append(token)
            run_trained = trained
    return "".join(out)


def render_tagged(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], names: Sequence[str]) -> str:
    """Words with their tags: "[CLS] johannesburg/B-LOC hosts/O [SEP]".

    A word is a labelled sub-word plus the unlabelled sub-words after it; special tokens stand
    alone. With label_all_subwords every sub-word is shown with its own tag.
    """
    special = set(tokenizer.all_special_ids)
    groups: list[tuple[list[int], int | None]] = []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX or token in special or not groups or groups[-1][0][-1] in special:
            groups.append(([token], None if label == IGNORE_INDEX else label))
        else:
            groups[-1][0].append(token)
    parts = []
    for ids, label in groups:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if label is not None:
            text += f"/{names[label] if 0 <= label < len(names) else label}"
        parts.append(text)
    return " ".join(parts)


def preview(
    data: Any,
    tokenizer: Any,
    n: int = 3,
    split: str = "train",
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    style: str = "brackets",
) -> PreviewReport:
    """Render the first `n` examples of `data` (a PreparedData) and check them.

    For packed data an example is one row inside a packed sequence. `collator` defaults to
    `data.collator`; pass the one training will use to check it keeps EOS labels.
    """
    dataset = data.train if split == "train" else data.eval
    if split not in ("train", "eval") or dataset is None:
        choices = "'train' or 'eval'" if data.eval is not None else "'train' (there is no eval data)"
        raise DataError(f"preview split {split!r} is not available; choose {choices}")
    report = PreviewReport()
    stats = data.stats if split == "train" else data.eval_stats
    features = [dataset[i] for i in range(min(len(dataset), max(n, 1)))]

    if data.task == "seq-cls":
        names = data.label_names or []
        for row in features[:n]:
            label = names[row["labels"]] if row["labels"] < len(names) else row["labels"]
            report.examples.append(f"{tokenizer.decode(row['input_ids'], skip_special_tokens=False)}\n=> label {label}")
        return report
    if data.task == "token-cls":
        names = data.label_names or []
        for k, row in enumerate(features[:n]):
            report.examples.append(render_tagged(tokenizer, row["input_ids"], row["labels"], names))
            if all(label == IGNORE_INDEX for label in row["labels"]):
                report.problems.append(f"{split} example {k + 1} has no tagged token, so it teaches nothing")
        if stats is not None and stats.rows_without_trained_tokens:
            report.problems.append(
                f"{stats.rows_without_trained_tokens} of {stats.examples} {split} rows have no tagged token "
                f"(e.g. max_length={data.max_length} leaves room for the special tokens only)"
            )
        return report
    if data.task == "seq2seq":
        for k, row in enumerate(features[:n]):
            target = render_example(tokenizer, row["labels"], row["labels"], style)
            source = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
            report.examples.append(f"input: {source}\ntarget: {target}")
            if not row["labels"]:
                report.problems.append(f"{split} example {k + 1} has no trained token (empty target)")
        return report

    shown = 0
    for s, row in enumerate(features):
        for ids, labels in _rows_of(row):
            if shown == n:
                break
            shown += 1
            where = f"{split} example {shown}" + (f" (packed sequence {s + 1})" if data.packed else "")
            report.examples.append(render_example(tokenizer, ids, labels, style))
            report.problems += _row_problems(where, ids, labels, tokenizer, data)
    if stats is not None and stats.rows_without_trained_tokens:
        report.problems.append(
            f"{stats.rows_without_trained_tokens} of {stats.examples} {split} rows have no trained token "
            f"(e.g. a prompt longer than max_length={data.max_length} was truncated before its completion)"
        )
    report.problems += _pad_eos_check(tokenizer, features, collator or data.collator, report)
    return report


def _rows_of(row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """A packed sequence split back into its rows (at each position 0); else the row itself."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    if "position_ids" not in row:
        return [(ids, labels)]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(ids)]
    return [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]


def _row_problems(where: str, ids: list[int], labels: list[int], tokenizer: Any, data: Any) -> list[str]:
    problems = []
    if all(label == IGNORE_INDEX for label in labels):
        problems.append(f"{where} has no trained token, so it teaches nothing (check train_on and the format)")
    eos = tokenizer.eos_token_id
    if data.add_eos and eos is not None and len(ids) < data.max_length:
        if ids[-1] != eos:
            problems.append(f"{where} does not end with the EOS token {tokenizer.eos_token!r} (id {eos})")
        elif labels[-1] != eos:
            problems.append(
                f"{where} ends with EOS {tokenizer.eos_token!r} but it is not trained (label -100), "
                "so the model never learns to stop"
            )
    return problems


def _pad_eos_check(tokenizer: Any, features: list[dict[str, Any]], collator: Any, report: PreviewReport) -> list[str]:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None or eos != pad:
        return []
    report.warnings.append(
        f"pad_token_id == eos_token_id ({eos}): a collator that masks labels by pad id also masks the EOS label"
    )
    if not features:
        return []
    try:
        batch = collator([dict(f) for f in features])
    except Exception as exc:  # a foreign collator may reject our columns; say so rather than guess
        return [f"the collator failed on {len(features)} examples: {type(exc).__name__}: {exc}"]
    labels = batch["labels"]
    for k, feature in enumerate(features):
        for position, label in enumerate(feature["labels"]):
            if label == eos and int(labels[k][position]) != eos:
                return [
                    f"pad_token_id == eos_token_id ({eos}) and the collator masked a trained EOS label "
                    f"(example {k + 1}, position {position} became {int(labels[k][position])}); "
                    "the model would never learn to stop. "
                    "Use peftkit's collator (it pads labels with -100 explicitly) or set a distinct pad token"
                ]
    return []
