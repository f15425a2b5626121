"""Using a trained adapter folder: `peftkit generate` and `peftkit eval`."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..data import IGNORE_INDEX, DataConfig, prepare_datasets, prompt_token_ids
from ..train import TrainConfig
from .loading import LoadedAdapter, LoadError, load_adapter
from .run import RUN_PACKED_ATTENTION, TaskHooks, evaluate_prepared, format_metrics
from .seq2seq import seq2seq_collate, seq2seq_loss


def _trained_format(loaded: LoadedAdapter) -> tuple[str | None, str | None]:
    """(row format, system prompt) the adapter was trained on, when the run left them beside it."""
    fmt = system = None
    data = (loaded.run_config or {}).get("data") or {}
    if data.get("format") not in (None, "auto"):
        fmt = data["format"]
    system = data.get("system_prompt")
    summary = os.path.join(loaded.adapter_dir, "summary.json")
    if fmt is None and os.path.isfile(summary):
        with open(summary, encoding="utf-8") as fh:
            fmt = json.load(fh).get("data_format")
    return fmt, system


def render_prompt(loaded: LoadedAdapter, prompt: str, input_text: str | None = None) -> tuple[str, bool]:
    """(text, add_special_tokens): the prompt as the model saw prompts in training (the text of
    `prompt_ids`; add_special_tokens: whether the tokenizer's own prefix, e.g. BOS, precedes it)."""
    fmt, _ = _trained_format(loaded)
    text, _ = prompt_ids(loaded, prompt, input_text)
    return text, _prompt_format(loaded, fmt) != "messages"


def prompt_ids(loaded: LoadedAdapter, prompt: str, input_text: str | None = None) -> tuple[str, list[int]]:
    """(text, token ids) the adapter's training rows had before their response, for `prompt`
    (and the Alpaca `input` field), rendered by the data pipeline's own code
    (`peftkit.data.prompt_token_ids`): the Alpaca template, the chat template with a generation
    prompt, or the prompt as is, with the same special tokens as in training.

    When the trained format is unknown (no run_config.yaml / summary.json), a tokenizer with a
    chat template gets it, otherwise the prompt is used as plain text.
    """
    fmt, system = _trained_format(loaded)
    fmt = _prompt_format(loaded, fmt)
    if input_text is not None and fmt != "alpaca":
        raise InputFieldError(f"--input is the 'input' field of Alpaca rows; {loaded.adapter_dir} was trained on "
                              f"{fmt or 'unknown'} rows: put everything in PROMPT")
    if fmt == "messages" and not getattr(loaded.tokenizer, "chat_template", None):
        raise LoadError(f"the adapter was trained on chat messages but the tokenizer in {loaded.adapter_dir} "
                        "has no chat_template")
    row = {
        "alpaca": {"instruction": prompt, "input": input_text},
        "messages": {"messages": [{"role": "user", "content": prompt}]},
        "prompt_completion": {"prompt": prompt},
        "text": {"text": prompt},
    }[fmt]
    return prompt_token_ids(loaded.tokenizer, loaded.task, fmt, row, system)


class InputFieldError(ValueError):
    """--input given for an adapter not trained on Alpaca rows."""


def _prompt_format(loaded: LoadedAdapter, fmt: str | None) -> str:
    if fmt in ("alpaca", "messages", "prompt_completion", "text"):
        return fmt if not (loaded.task == "seq2seq" and fmt in ("messages", "text")) else "prompt_completion"
    return "messages" if getattr(loaded.tokenizer, "chat_template", None) and loaded.task != "seq2seq" else "text"


def generate(adapter_dir: str, prompt: str, *, max_new_tokens: int = 128, base: str | None = None,
             temperature: float = 0.0, stream: bool = True, dtype: str = "auto", check_finite: bool = True,
             input_text: str | None = None) -> str:
    """Generate a reply to `prompt` with the adapter on its base model; streams it to stdout
    (transformers' TextStreamer) when `stream`, with a note on stderr when the reply is empty.
    Greedy unless temperature > 0. `input_text`: the `input` field of an Alpaca-trained adapter.
    The prompt is rendered as the training rows were (`prompt_ids`). Returns the new text."""
    from transformers import TextStreamer

    problems = []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        problems.append(f"temperature={temperature!r}: expected a number >= 0 (0: greedy)")
    if problems:
        raise ValueError("; ".join(problems))
    loaded = load_adapter(adapter_dir, base, dtype, check_finite=check_finite)
    if loaded.task not in ("causal-lm", "seq2seq"):
        raise LoadError(f"generate needs a causal-lm or seq2seq adapter; {adapter_dir} is a {loaded.task} adapter "
                        f"(use `peftkit eval {adapter_dir} --data FILE`)")
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise LoadError(f"no tokenizer in {adapter_dir} or {loaded.base_path}; generate needs one")
    _, ids = prompt_ids(loaded, prompt, input_text)
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    device = next(loaded.model.parameters()).device
    # input_ids and attention_mask only, as the training batches had: a BERT-style tokenizer's
    # token_type_ids would be refused by generate() for a model whose forward does not take them.
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options["temperature"] = float(temperature)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        options["pad_token_id"] = pad
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = loaded.model.generate(**inputs, streamer=streamer, **options)
    new = output[0] if loaded.task == "seq2seq" else output[0, inputs["input_ids"].shape[1]:]
    reply = tokenizer.decode(new, skip_special_tokens=True)
    if stream and not reply.strip():
        print(empty_reply_note(tokenizer, new.tolist()), file=sys.stderr)
    return reply


def empty_reply_note(tokenizer: Any, new_ids: list[int]) -> str:
    """Why a reply printed nothing: the model ended at once, or wrote only special tokens / spaces."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    eos = tokenizer.eos_token_id
    content = [i for i in new_ids if i not in special]
    if not content and eos in new_ids:
        return "(empty reply: the model produced only end-of-sequence)"
    if not content:
        return f"(empty reply: the model produced only special tokens: {new_ids[:8]})"
    return f"(empty reply: the model produced only whitespace: {tokenizer.decode(content)!r})"


@dataclass
class EvalReport:
    adapter_dir: str
    data_path: str
    task: str
    rows: int
    metrics: dict[str, float]

    def text(self) -> str:
        return f"eval of {self.adapter_dir} on {self.data_path} ({self.rows} rows, {self.task}): " \
               f"{format_metrics(self.metrics)}"


def evaluate_adapter(adapter_dir: str, data_path: str, *, base: str | None = None, batch_size: int = 8,
                     max_length: int | None = None, dtype: str = "auto", check_finite: bool = True) -> EvalReport:
    """Loss and perplexity (causal-lm, seq2seq) or accuracy (seq-cls: per row, token-cls: per
    tagged token) of an adapter on a data file.

    The rows are read with the data settings of the run that trained the adapter (its
    run_config.yaml) when there is one, so prompts are formatted and masked the same way.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    loaded = load_adapter(adapter_dir, base, dtype, check_finite=check_finite)
    settings = dict((loaded.run_config or {}).get("data") or {})
    settings.update(path=data_path, eval_path=None, eval_split=0.0)
    if max_length is not None:
        settings["max_length"] = max_length
    if loaded.tokenizer is None:
        raise LoadError(f"no tokenizer in {adapter_dir} or {loaded.base_path}; eval needs one")
    data = prepare_datasets(DataConfig.from_dict(settings), loaded.tokenizer, loaded.task,
                            packed_attention=RUN_PACKED_ATTENTION)
    rows: Any = data.train
    if loaded.task in ("seq-cls", "token-cls"):
        rows = _relabel(rows, data.label_names or [], loaded.labels or [], data_path)
    train_task = "causal-lm" if loaded.task == "seq2seq" else loaded.task
    hooks = TaskHooks(
        TrainConfig(task=train_task, micro_batch_size=batch_size, progress=False).validate(),
        seq2seq_collate(data.collator) if loaded.task == "seq2seq" else data.collator,
        seq2seq_loss if loaded.task == "seq2seq" else None,
    )
    metrics = evaluate_prepared(loaded.model, rows, hooks)
    return EvalReport(adapter_dir, data_path, loaded.task, len(rows), metrics)


def _relabel(rows: Any, file_labels: list[str], model_labels: list[str], where: str) -> list[dict[str, Any]]:
    """Rows with class indices of the model's head (the file's own label order may differ);
    labels are one class per row (seq-cls) or per token with -100 kept (token-cls)."""
    index = {name: i for i, name in enumerate(model_labels)}
    if all(name.isdigit() for name in file_labels) and not any(name in index for name in file_labels):
        index = {str(i): i for i in range(len(model_labels))}  # the file gives class indices
    unknown = [name for name in file_labels if name not in index]
    if unknown:
        raise LoadError(f"{where}: labels {unknown} are not classes of the adapter; its classes: {model_labels}")
    mapping = [index[name] for name in file_labels]

    def convert(labels: Any) -> Any:
        if isinstance(labels, int):
            return mapping[labels]
        return [label if label == IGNORE_INDEX else mapping[label] for label in labels]

    return [dict(row, labels=convert(row["labels"])) for row in rows]
