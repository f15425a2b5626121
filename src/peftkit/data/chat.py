"""Chat rows: render with the tokenizer's own template and find the assistant tokens.

The template is never edited. For each assistant turn i the conversation is rendered twice:
`messages[:i]` with `add_generation_prompt=True` (the prompt the model sees at inference)
and `messages[:i+1]`; the tokens between the two are that turn's trained span. This is
only sound when each rendering is a token prefix of the next (and of the whole
conversation), which is checked for every row; a template that breaks it is an error.
"""

from __future__ import annotations

from typing import Any

from .errors import RowError


def chat_texts(
    tokenizer: Any, messages: list[dict[str, Any]], system_prompt: str | None
) -> tuple[list[str], list[int]]:
    """The renderings to tokenize, and the index of each assistant message.

    texts[0] is the whole conversation; then, per assistant message i, the conversation
    before it with the generation prompt and the conversation through it.
    """
    messages = _with_system(messages, system_prompt)
    _require_template(tokenizer)
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise RowError(f"conversation has no 'assistant' message (roles: {roles}); there is nothing to train on")
    if roles[-1] != "assistant":
        raise RowError(f"conversation ends with a {roles[-1]!r} message; the last message must be from the assistant")

    full = _render(tokenizer, messages, add_generation_prompt=False)
    turns = [i for i, role in enumerate(roles) if role == "assistant"]
    texts = [full]
    for i in turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        # The last message is the assistant's, so the conversation through it is `full`.
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _check_text_prefix(before, through, f"messages[:{i}] with add_generation_prompt=True", f"messages[:{i + 1}]")
        _check_text_prefix(through, full, f"messages[:{i + 1}]", "the whole conversation")
        texts += [before, through]
    return texts, turns


def generation_prompt_text(tokenizer: Any, messages: list[dict[str, Any]], system_prompt: str | None) -> str:
    """The conversation so far rendered as training rendered the text before an assistant turn
    (the system prompt added the same way, the generation prompt appended): what to generate from."""
    _require_template(tokenizer)
    return _render(tokenizer, _with_system(messages, system_prompt), add_generation_prompt=True)


def _with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError(
            "the tokenizer has no chat_template, which the 'messages' format needs; "
            "set tokenizer.chat_template or use a prompt/completion format"
        )


def chat_mask(encoded: list[list[int]], turns: list[int], train_on: str) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether it is trained.

    `encoded` are the token ids of `chat_texts`' texts (encoded without special tokens).
    Trained: the assistant turns (`train_on="completion"`) or every token (`"all"`).
    """
    ids = list(encoded[0])
    trained = [train_on == "all"] * len(ids)
    for k, i in enumerate(turns):
        before, through = encoded[1 + 2 * k], encoded[2 + 2 * k]
        names = (f"messages[:{i}] with add_generation_prompt=True", f"messages[:{i + 1}]")
        for part, name in zip((before, through), names):
            if ids[: len(part)] != list(part):
                raise RowError(
                    f"the chat template is not token-prefix-consistent: the tokens of {name} are not a prefix of the "
                    "tokens of the whole conversation (the text is, so the tokenizer merges across the turn "
                    "boundary); assistant tokens cannot be located without editing the template"
                )
        for position in range(len(before), len(through)):
            trained[position] = True
    return ids, trained


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises TemplateError subclasses, and templates raise_exception()
        raise RowError(f"the chat template failed to render the conversation: {type(exc).__name__}: {exc}") from exc
    if not isinstance(text, str):
        raise RowError(f"apply_chat_template returned {type(text).__name__}, expected the rendered text")
    return text


def _check_text_prefix(prefix: str, whole: str, prefix_name: str, whole_name: str) -> None:
    if whole.startswith(prefix):
        return
    at = next((k for k, (a, b) in enumerate(zip(prefix, whole)) if a != b), min(len(prefix), len(whole)))
    raise RowError(
        f"the chat template is not prefix-consistent: rendering {prefix_name} gives text that is not a prefix of "
        f"rendering {whole_name} (they differ at character {at}: {prefix[at:at + 30]!r} vs {whole[at:at + 30]!r}); "
        "assistant tokens cannot be located without editing the template"
    )
