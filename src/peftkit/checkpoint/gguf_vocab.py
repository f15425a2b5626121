"""A transformers tokenizer as GGUF metadata, the way llama.cpp's convert_hf_to_gguf.py writes
byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`): tokens, token types, merges, special
token ids, whether BOS / EOS are added, and the chat template.

llama.cpp re-implements each pre-tokenizer by name (`tokenizer.ggml.pre`); the names written here
are recognised from the tokenizer's own pre-tokenizer (not from a hash of its output, as
convert_hf_to_gguf.py does, so a tokenizer trained here converts too): GPT-2's built-in regex
("gpt-2"), Llama 3's ("llama-bpe") and Qwen2's ("qwen2"). Anything else (SentencePiece models,
WordPiece, other regexes, normalizers) is refused by name rather than written in a form
llama.cpp would tokenize differently (Qwen2's NFC normalizer is the one exception, as in
convert_hf_to_gguf.py).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from .gguf import import_gguf

# tokenizer.json `Split` regexes -> llama.cpp pre-tokenizer names (llama-vocab.cpp lists them).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
SUPPORTED = "byte-level BPE with GPT-2's, Llama 3's or Qwen2's pre-tokenizer"


def _is_plain_byte_level(spec: dict, use_regex: bool) -> bool:
    return (spec.get("type") == "ByteLevel" and not spec.get("add_prefix_space", False)
            and bool(spec.get("use_regex", True)) == use_regex)


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, None when it has none."""
    if not pre:
        return None
    if _is_plain_byte_level(pre, use_regex=True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and _is_plain_byte_level(parts[1], use_regex=False):
        return SPLIT_PRE_TOKENIZERS.get(parts[0].get("pattern", {}).get("Regex"))
    return None


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special, for added tokens not flagged special
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def vocab_writer(tokenizer: Any, vocab_size: int) -> Callable[[Any], None]:
    """Check `tokenizer` now (ValueError naming what is unsupported) and return `add(writer)`,
    which adds its GGUF metadata; `vocab_size` is the model's (rows of the embedding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    name = type(tokenizer).__name__
    if backend is None:
        raise ValueError(f"GGUF export: tokenizer {name} has no `tokenizers` backend (a slow or SentencePiece "
                         f"tokenizer); supported: {SUPPORTED}")
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer")
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (not BPE)")
    pre_name = pre_tokenizer_name(pre)
    normalizer = (spec.get("normalizer") or {}).get("type")
    # Qwen2's tokenizers NFC-normalize; llama.cpp's qwen2 tokenizer does not, and
    # convert_hf_to_gguf.py writes them all the same (text already in NFC tokenizes alike).
    if normalizer and not (normalizer == "NFC" and pre_name == "qwen2"):
        problems.append(f"normalizer {normalizer!r}")
    if pre_name is None:
        problems.append(f"pre-tokenizer {json.dumps(pre)[:200]}")
    if problems:
        raise ValueError(f"GGUF export: tokenizer {name} cannot be written for llama.cpp ({'; '.join(problems)}); "
                         f"supported: {SUPPORTED}")
    gguf = import_gguf()
    ids = dict(tokenizer.get_vocab())
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has token id {max(ids.values())} but the model's vocab_size is "
                         f"{vocab_size}")
    added = getattr(tokenizer, "added_tokens_decoder", {})
    by_id = {i: t for t, i in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = getattr(added[i], "special", False) or _looks_special(token)
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)

    def add(writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_name)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for kind in ("bos", "eos", "unk", "pad"):
            token_id = getattr(tokenizer, f"{kind}_token_id", None)
            if token_id is not None:
                getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
        writer.add_add_eos_token(eos is not None and bool(probe) and probe[-1] == eos)
        if isinstance(template, str):
            writer.add_chat_template(template)

    return add
