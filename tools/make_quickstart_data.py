"""Generate the bundled quickstart dataset (customer-support messages -> 6 intent labels).

    python tools/make_quickstart_data.py [--out-dir src/peftkit/quickstart]

Writes train.jsonl, eval.jsonl (one {"text", "label"} object per line) and DATA.md.
Output is byte-for-byte reproducible: one seeded random.Random drives every choice.

Each class's hand-written core sentences are split once into train-only and eval-only
sets, so the eval split measures generalisation to request wordings never seen in
training, not recall of a template with new fillers.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import quickstart_material as M

SEED = 1234
TRAIN_PER_CLASS = 210
EVAL_PER_CLASS = 55
EVAL_CORE_FRACTION = 0.2
MIN_WORDS, MAX_WORDS = 8, 60
# The quickstart truncates to 64 tokens; with the MiniLM tokenizer the first 36 words of
# these texts take at most ~60 word pieces, so truncation never cuts the deciding request.
MAX_WORDS_THROUGH_CORE = 36

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "peftkit" / "quickstart"

REGISTERS = ["plain", "polite", "terse", "angry", "rambling"]
REGISTER_WEIGHTS = [30, 25, 15, 12, 18]

_SLOT = re.compile(r"\{(\w+)\}")
# Sentence-initial words in the material that stay capitalised after "Hi,".
_PROPER_NOUNS = {"English"}


def _fill_values(rng: random.Random) -> dict[str, str]:
    """One value per slot for a whole message, so a product named twice stays the same."""
    values = {slot: rng.choice(options) for slot, options in M.FILLERS.items()}
    number = rng.randint(100000, 999999)
    values["order"] = rng.choice(
        [f"order #{number}", f"order {number}", f"order number {number}", f"my order #{number}"]
    )
    currency = rng.choice(["$", "£", "€"])
    values["amount"] = f"{currency}{rng.randint(4, 420)}.{rng.choice(['00', '49', '50', '95', '99'])}"
    values["bought"] = rng.choice([d for d in M.FILLERS["date"] if d != values["date"]])
    values["last4"] = f"{rng.randint(0, 9999):04d}"
    values["code"] = f"E{rng.randint(1, 99):02d}"
    return values


def _fill(template: str, values: dict[str, str]) -> str:
    text = _SLOT.sub(lambda m: values[m.group(1)], template)
    # Templates that open with a slot ("{order} was meant to ...") need a capital letter,
    # unless the template is an informal lower-case one.
    if template.startswith("{") and template.rstrip()[-1:] in ".?!":
        text = text[0].upper() + text[1:]
    return text


def _as_sentence(text: str) -> str:
    """Informal cores have no final stop; add one when another sentence follows."""
    return text if text[-1] in ".?!" else text + "."


def _terse(text: str, rng: random.Random) -> str:
    """Chat-box style: drop the capital and the full stop of a written sentence."""
    if rng.random() < 0.5 and text[0].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    if text.endswith(".") and not text.endswith("...") and rng.random() < 0.6:
        text = text[:-1]
    return text


def _join(parts: list[str], keep_case: set[int]) -> str:
    """Join sentences: capital after a full stop, "Hi, can I" rather than "Hi, Can I"."""
    out: list[str] = []
    for i, part in enumerate(parts):
        if out and out[-1][-1] in ".?!":
            part = part[0].upper() + part[1:]
        elif out and out[-1].endswith(",") and i not in keep_case:
            first = part.split()[0]
            # "I", "I'm", "I've" ... keep their capital.
            if (
                re.fullmatch(r"[A-Z][a-z']*,?", first)
                and not re.match(r"I('|,|$)", first)
                and first not in _PROPER_NOUNS
            ):
                part = part[0].lower() + part[1:]
        out.append(part)
    return " ".join(out)


def _closing(rng: random.Random, values: dict[str, str]) -> str:
    if rng.random() < 0.3:
        return f"{rng.choice(M.SIGN_OFFS)}, {values['name']}."
    return rng.choice(M.CLOSINGS)


def compose(label: str, core: str, spare_cores: list[str], rng: random.Random) -> tuple[str, int]:
    """Build one message around `core`; returns (text, number of words up to the core's end)."""
    values = _fill_values(rng)
    register = rng.choices(REGISTERS, weights=REGISTER_WEIGHTS)[0]
    before: list[str] = []
    after: list[str] = []
    core_text = _fill(core, values)

    def detail() -> str:
        return _fill(rng.choice(M.DETAILS[label]), values)

    def aside() -> str:
        return _fill(rng.choice(M.ASIDES[label]), values)

    if register == "terse":
        n_core = len(core_text.split())
        if rng.random() < 0.35:
            # Only the last sentence loses its stop, so the two never run together.
            first = _as_sentence(core_text)
            if rng.random() < 0.5 and first[0].isupper() and first[1:2].islower():
                first = first[0].lower() + first[1:]
            return first + " " + _terse(detail(), rng), n_core
        return _terse(core_text, rng), n_core

    if register == "plain":
        if rng.random() < 0.5:
            before.append(rng.choice(M.OPENINGS))
        if rng.random() < 0.5:
            after.append(detail())
        if rng.random() < 0.25:
            (before if rng.random() < 0.4 else after).append(aside())
        if rng.random() < 0.4:
            after.append(_closing(rng, values))
    elif register == "polite":
        before.append(rng.choice(M.OPENINGS))
        if rng.random() < 0.3:
            before.append(rng.choice(M.BACKGROUNDS))
        if rng.random() < 0.5:
            after.append(detail())
        if rng.random() < 0.2:
            (before if rng.random() < 0.4 else after).append(aside())
        after.append(_closing(rng, values))
    elif register == "angry":
        before.append(rng.choice(M.ANGRY_OPENINGS))
        if rng.random() < 0.3:
            before.append(rng.choice(M.BACKGROUNDS))
        if rng.random() < 0.4:
            after.append(detail())
        if rng.random() < 0.15:
            after.append(aside())
        if rng.random() < 0.7:
            # "Sort it out" makes no sense after a plain question about a product.
            closings = M.ANGRY_CLOSINGS[:3] if label == "product_question" else M.ANGRY_CLOSINGS
            after.append(rng.choice(closings))
    else:  # rambling
        if rng.random() < 0.7:
            before.append(rng.choice(M.OPENINGS))
        before.extend(rng.sample(M.BACKGROUNDS, rng.choice([1, 2])))
        if rng.random() < 0.5:
            (before if rng.random() < 0.4 else after).append(aside())
        if rng.random() < 0.3:
            written = [c for c in spare_cores if c != core and c[-1] in ".?!"]
            second = rng.choice(written)
            after.append(_as_sentence(_fill(second, values)))
        if rng.random() < 0.7:
            after.append(detail())
        if rng.random() < 0.7:
            after.append(_closing(rng, values))

    parts = before + [_as_sentence(core_text) if after else core_text] + after
    # A core opening with a slot keeps the slot value's own case after a comma
    # ("Hi, Bluetooth speaker won't ..." but "Hi, the courier says ...").
    slot = core[1 : core.index("}")] if core.startswith("{") else None
    keep_case = {len(before)} if slot and values[slot][0].isupper() else set()
    text = _join(parts, keep_case)
    return text, len(_join(parts[: len(before) + 1], keep_case).split())


def split_cores(rng: random.Random) -> dict[str, tuple[list[str], list[str]]]:
    """Per class: (train cores, eval cores), disjoint."""
    out = {}
    for label, cores in M.CORES.items():
        order = list(cores)
        rng.shuffle(order)
        n_eval = round(len(order) * EVAL_CORE_FRACTION)
        out[label] = (order[n_eval:], order[:n_eval])
    return out


def generate(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return (train rows, eval rows), each shuffled, balanced per class, no shared text."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    for label, (train_cores, eval_cores) in split_cores(rng).items():
        for split, cores, target in (
            ("train", train_cores, TRAIN_PER_CLASS),
            ("eval", eval_cores, EVAL_PER_CLASS),
        ):
            made, queue, attempts = 0, [], 0
            while made < target:
                attempts += 1
                if attempts > target * 50:
                    raise RuntimeError(f"could not make {target} unique {split} texts for {label!r}")
                # Cycle through the cores in shuffled rounds so each is used about equally.
                if not queue:
                    queue = list(cores)
                    rng.shuffle(queue)
                core = queue.pop()
                text, through_core = compose(label, core, cores, rng)
                n_words = len(text.split())
                if not (MIN_WORDS <= n_words <= MAX_WORDS) or through_core > MAX_WORDS_THROUGH_CORE:
                    queue.append(core)
                    continue
                if text in seen:
                    queue.append(core)
                    continue
                seen.add(text)
                splits[split].append({"text": text, "label": label})
                made += 1
    for rows in splits.values():
        rng.shuffle(rows)
    return splits["train"], splits["eval"]


def _counts_table(train: list[dict[str, str]], eval_: list[dict[str, str]]) -> str:
    tr, ev = Counter(r["label"] for r in train), Counter(r["label"] for r in eval_)
    lines = ["| label | train | eval |", "|---|---:|---:|"]
    lines += [f"| `{label}` | {tr[label]} | {ev[label]} |" for label in M.LABELS]
    lines.append(f"| **total** | {len(train)} | {len(eval_)} |")
    return "\n".join(lines)


def _label_word_shares(rows: list[dict[str, str]]) -> str:
    """E.g. "returns_refunds 38%": messages of a class containing 'return...' or 'refund...'."""
    parts = []
    for label in M.LABELS:
        stems = [w.rstrip("s") for w in label.split("_")]
        own = [r["text"].lower() for r in rows if r["label"] == label]
        hits = sum(any(re.search(rf"\b{stem}", t) for stem in stems) for t in own)
        parts.append(f"`{label}` {100 * hits / len(own):.0f}%")
    return ", ".join(parts)


def render_data_md(train: list[dict[str, str]], eval_: list[dict[str, str]]) -> str:
    n_cores = sum(len(c) for c in M.CORES.values())
    min_c, max_c = min(map(len, M.CORES.values())), max(map(len, M.CORES.values()))
    definitions = "\n".join(f"- `{label}`: {text}." for label, text in M.LABELS.items())
    return f"""# Quickstart dataset: customer-support intents

`train.jsonl` and `eval.jsonl` hold short English messages that customers might send to
the support desk of an online shop, each labelled with what the message asks for. They
are what `peftkit train` (no arguments) fine-tunes its small text classifier on, offline.

Format: one JSON object per line, `{{"text": "...", "label": "<label name>"}}`.

## Provenance and license

Written for peftkit by its developers. Every sentence was written by hand for this
project: {n_cores} core request sentences ({min_c}-{max_c} per class), plus shared openings,
background remarks, closings, class-consistent details and cross-topic asides, all in
`tools/quickstart_material.py`. `tools/make_quickstart_data.py` composes them into
messages with a seeded random generator. No text was scraped, copied or machine-collected,
and no label is random: each message's label is the class of the request sentence it was
built around. License: Apache-2.0, the same as the project.

## Labels

Where two topics meet, the definition says which one wins:

{definitions}

## Counts

{_counts_table(train, eval_)}

## How the messages are built

- A message is one core request, optionally wrapped in an opening, one or two background
  remarks, a detail that fits the class, an aside that borrows another class's
  vocabulary (e.g. "The delivery was quick, no complaints there." inside a billing
  message), a closing and a first name. Registers: plain, polite, terse (chat-style, lower
  case), angry and rambling (sometimes two requests of the same class).
- Slots are filled with order numbers, products, devices, browsers, couriers, cities,
  dates and amounts, so the same request appears with different details.
- Each class's core sentences are split once: {round(EVAL_CORE_FRACTION * 100)}% are used only for
  eval and the rest only for train. Eval therefore tests request wordings the model has
  never seen, and no eval text appears in train.
- Label names are mostly absent from the texts, so no keyword solves the task. Share of
  each class's train messages that contain a word of its own label name:
  {_label_word_shares(train)}.
- Texts are {MIN_WORDS}-{MAX_WORDS} words; the request always ends within the first
  {MAX_WORDS_THROUGH_CORE} words, so truncating to 64 tokens keeps it.

## Regenerate

```
python tools/make_quickstart_data.py            # writes into src/peftkit/quickstart/
python tools/make_quickstart_data.py --out-dir /tmp/qs
```

The output is deterministic (seed {SEED}); edit the material or the seed, rerun, and
commit the three files together. `tests/test_quickstart_data.py` checks that the committed
files match the generator.
"""


def write(out_dir: Path, seed: int = SEED) -> tuple[int, int]:
    """Write train.jsonl, eval.jsonl and DATA.md into out_dir; returns (n_train, n_eval)."""
    train, eval_ = generate(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_)):
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "DATA.md").write_text(render_data_md(train, eval_), encoding="utf-8", newline="\n")
    return len(train), len(eval_)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    n_train, n_eval = write(args.out_dir, args.seed)
    print(f"wrote {n_train} train and {n_eval} eval rows to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
