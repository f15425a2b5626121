"""Row formats: which columns each needs, detecting one from column names, checking a row."""

from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import DataError

# format -> (required columns, optional columns)
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "classification": (("text", "label"), ()),
    "token_classification": (("tokens", "tags"), ()),
}

# Other libraries' name for the tags column (conll2003, wikiann, ... on the hub): read as `tags`
# for task token-cls when the data has no `tags` column and column_mapping does not say otherwise.
TAG_ALIASES = ("ner_tags",)

# Formats each task can train on, in detection priority (first match wins, so a dataset
# with both `messages` and `text` columns is read as chat).
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("messages", "alpaca", "prompt_completion", "text"),
    "seq-cls": ("classification",),
    "seq2seq": ("alpaca", "prompt_completion"),
    "token-cls": ("token_classification",),
}

# The prompt text of Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def with_tag_alias(mapping: dict[str, str], columns: Iterable[str], task: str) -> dict[str, str]:
    """`mapping` plus {"ner_tags": "tags"} for token-cls data that has `ner_tags` but no `tags`."""
    columns = list(columns)
    if task != "token-cls" or "tags" in mapping.values() or any(mapping.get(c, c) == "tags" for c in columns):
        return mapping
    for alias in TAG_ALIASES:
        if alias in columns and alias not in mapping:
            return {**mapping, alias: "tags"}
    return mapping


def format_columns(fmt: str) -> tuple[str, ...]:
    required, optional = FORMAT_COLUMNS[fmt]
    return required + optional


def detect_format(columns: Iterable[str], task: str, requested: str, where: str) -> str:
    """The row format of a source with these (already renamed) columns.

    `requested` is the config's `format` ("auto" to detect); `where` names the source in errors.
    """
    columns = list(columns)
    allowed = TASK_FORMATS[task]
    needs = "; ".join(f"{f}: {' + '.join(FORMAT_COLUMNS[f][0])}" for f in allowed)
    hint = 'map other names with data.column_mapping, e.g. {"question": "prompt", "answer": "completion"}'
    if requested != "auto":
        if requested not in allowed:
            raise DataError(
                f"data.format {requested!r} cannot be used for task {task!r}; "
                f"formats for this task: {', '.join(allowed)}"
            )
        missing = [c for c in FORMAT_COLUMNS[requested][0] if c not in columns]
        if missing:
            raise DataError(
                f"{where}: format {requested!r} needs column(s) {missing}, found columns {columns}; {hint}"
            )
        return requested
    for fmt in allowed:
        if all(c in columns for c in FORMAT_COLUMNS[fmt][0]):
            return fmt
    raise DataError(
        f"{where}: cannot detect the row format for task {task!r} from columns {columns}; "
        f"accepted formats and the columns they need: {needs}; {hint}"
    )


def row_problem(row: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with one row of format `fmt` (a message naming the field), or None."""
    if fmt == "token_classification":
        return _token_row_problem(row)
    required, optional = FORMAT_COLUMNS[fmt]
    for name in required + optional:
        value = row.get(name)
        if _is_missing(value):
            if name in optional:
                continue
            return f"missing field {name!r}"
        if name == "messages":
            problem = _messages_problem(value)
        elif name == "label":
            problem = _label_problem(value)
        elif not isinstance(value, str):
            problem = f"field {name!r} is {_describe(value)}, expected a string"
        elif value == "" and name not in ("prompt", "input"):
            problem = f"field {name!r} is an empty string"
        else:
            problem = None
        if problem:
            return problem
    return None


def normalize_label(value: Any) -> str | int:
    """A checked label as a class name (str) or class index (int)."""
    if isinstance(value, float):
        return int(value)
    return value


def alpaca_prompt(instruction: str, input_text: str | None, system_prompt: str | None = None) -> str:
    """The standard Alpaca prompt (ending with "### Response:\\n"), after `system_prompt` if given."""
    if input_text:
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({text})"


def _label_problem(value: Any) -> str | None:
    if isinstance(value, bool):
        return f"field 'label' is {_describe(value)}, expected a class name (string) or class index (integer)"
    if isinstance(value, int):
        return None if value >= 0 else f"field 'label' is {value}, a class index must be >= 0"
    if isinstance(value, float):
        if value.is_integer() and value >= 0:
            return None
        return f"field 'label' is {_describe(value)}, expected a class name (string) or class index (integer)"
    if isinstance(value, str):
        return None if value else "field 'label' is an empty string"
    return f"field 'label' is {_describe(value)}, expected a class name (string) or class index (integer)"


def tag_kind(value: Any) -> type:
    """str for a tag name, int for a class index (a checked tag)."""
    return str if isinstance(value, str) else int


def _token_row_problem(row: dict[str, Any]) -> str | None:
    """`tokens`: a non-empty list of words (non-empty strings); `tags`: one tag per word, all
    names (strings) or all class indices (integers >= 0)."""
    tokens, tags = row.get("tokens"), row.get("tags")
    for name, value in (("tokens", tokens), ("tags", tags)):
        if _is_missing(value):
            return f"missing field {name!r}"
        if not isinstance(value, list):
            what = "words (strings)" if name == "tokens" else "tags, one per word"
            return f"field {name!r} is {_describe(value)}, expected a list of {what}"
    if not tokens:
        return "field 'tokens' is an empty list"
    for i, word in enumerate(tokens):
        if not isinstance(word, str):
            return f"tokens[{i}] is {_describe(word)}, expected a word (string)"
        if not word:
            return f"tokens[{i}] is an empty string"
    if len(tags) != len(tokens):
        return f"field 'tags' has {len(tags)} entries but 'tokens' has {len(tokens)} words; give one tag per word"
    for i, tag in enumerate(tags):
        if isinstance(tag, bool) or not isinstance(tag, (str, int)) or tag == "" or (isinstance(tag, int) and tag < 0):
            return f"tags[{i}] is {_describe(tag)}, expected a tag name (non-empty string) or class index (integer >= 0)"
    kinds = {tag_kind(tag) for tag in tags}
    if len(kinds) > 1:
        return "field 'tags' mixes tag names (strings) and class indices (integers); use one kind"
    return None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"field 'messages' is {_describe(messages)}, expected a list of {{role, content}} objects"
    if not messages:
        return "field 'messages' is an empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is {_describe(message)}, expected an object with 'role' and 'content'"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return f"messages[{i}].role is {'missing' if role is None else _describe(role)}, expected a string"
        if not isinstance(content, str):
            shown = "missing" if content is None else _describe(content)
            return f"messages[{i}].content is {shown}, expected a string"
    return None
