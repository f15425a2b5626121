"""The `peftkit` command: argument parsing only; each command is one call into `peftkit.recipe`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

EPILOG = """examples:
  peftkit train                               the built-in quickstart (offline text classifier)
  peftkit train config.yaml train.lr=1e-4     a run from a YAML file, with dotted overrides
  peftkit train config.yaml --dry-run         resolved config and step/token/parameter counts
  peftkit preview config.yaml -n 5            tokenized examples with the trained tokens marked
  peftkit merge out/run --out merged/         adapter folded into a plain transformers model
  peftkit export out/run --to gguf --out a.gguf         the adapter as a llama.cpp LoRA (--lora a.gguf)
  peftkit export out/run --to gguf-merged --out m.gguf  merged model as one llama.cpp file
  peftkit export out/run --check vllm --out clean/      loads in vLLM (or sglang)? exit 1: why not
  peftkit generate out/run "Hello"            stream a reply (causal LM adapters)
  peftkit eval out/run --data test.jsonl      loss / perplexity or accuracy (per row / per tagged token)
  peftkit inspect MODEL --config config.yaml  targetable modules, what the config matches
"""

ALLOW_NONFINITE_HELP = "load an adapter holding NaN/Inf values anyway (to inspect a broken file); refused by default"

# Exit codes: 1 = the command ran and found a problem (preview, parity, inspect) or failed;
# 2 = the command line or config is wrong (argparse uses 2 as well).
EXIT_PROBLEM, EXIT_USAGE = 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning: train, inspect and use adapters.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune from a YAML config (no config: the built-in quickstart)",
                       description="Fine-tune from a YAML run config. KEY=VALUE overrides any setting, e.g. "
                                   "train.lr=1e-4 adapter.r=16 (values are read as YAML). Without CONFIG, "
                                   "runs the built-in quickstart.")
    p.add_argument("args", nargs="*", metavar="CONFIG | KEY=VALUE", help="config file, then overrides")
    p.add_argument("--quickstart", action="store_true", help="run the quickstart; every argument is an override")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and derived numbers; loads no weights")
    p.add_argument("--no-eval-before", action="store_true", help="skip the eval pass before training")

    p = sub.add_parser("preview", help="show tokenized examples with the trained tokens marked, and check them")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--split", default="train", choices=("train", "eval"))
    p.add_argument("--color", action="store_true", help="mark trained tokens in green instead of [[...]]")

    p = sub.add_parser("merge", help="merge an adapter into its base model and check parity")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    p.add_argument("--base", metavar="MODEL", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="dtype of the saved weights (auto: the base checkpoint's)")
    p.add_argument("--tolerance", type=float, help="parity tolerance relative to the largest output")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split the weights into shards with an index above this size (default 5GB)")
    p.add_argument("--requantize", action="store_true",
                   help="adapter trained on a quantized base: quantize the merged layers again (a 4/8-bit model "
                        "folder) instead of writing them plain")

    p = sub.add_parser("export", help="write an adapter for llama.cpp (GGUF), or check it loads in vLLM / SGLang",
                       description="--to gguf: the adapter as a llama.cpp LoRA file; --to gguf-merged: the merged "
                                   "model as one GGUF file; --check SERVER: whether the adapter loads in that "
                                   "server (exit 0 ready, 1 not, one reason a line).")
    p.add_argument("adapter", metavar="ADAPTER")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=("gguf", "gguf-merged"), help="file format to write (needs --out FILE)")
    what.add_argument("--check", choices=("vllm", "sglang"), help="serving readiness check")
    p.add_argument("--out", metavar="PATH",
                   help="--to: the GGUF file; --check: a folder for a clean copy (config + weights), when ready")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16"),
                   help="--to only: tensor dtype (default f32 for gguf, f16 for gguf-merged)")
    p.add_argument("--base", metavar="MODEL", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--max-lora-rank", type=int, metavar="N",
                   help="--check only: the server's max_lora_rank (default: its default, vLLM 16)")

    p = sub.add_parser("generate", help="generate text with an adapter (streams the reply)")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    p.add_argument("--input", metavar="TEXT", dest="input_text",
                   help="the 'input' field of an Alpaca-trained adapter (PROMPT is the instruction)")
    p.add_argument("--base", metavar="MODEL")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--allow-nonfinite", action="store_true", help=ALLOW_NONFINITE_HELP)

    p = sub.add_parser("eval", help="loss/perplexity or accuracy of an adapter on a data file")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument("--base", metavar="MODEL")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="default: the training run's data.max_length")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--allow-nonfinite", action="store_true", help=ALLOW_NONFINITE_HELP)

    p = sub.add_parser("inspect", help="modules an adapter can target; what a config matches; sizes")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--config", metavar="CONFIG.yaml")
    # data.tasks.TASKS, spelled out so `peftkit --help` stays quick (tests/data/test_tasks.py holds them equal).
    p.add_argument("--task", choices=("causal-lm", "seq-cls", "seq2seq", "token-cls"),
                   help="default: from the model's config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for --config")
    # `peftkit train c.yaml --traceback` as well as `peftkit --traceback train c.yaml`; SUPPRESS
    # keeps a command's parser from resetting the flag given before the command.
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser


def _train(args: argparse.Namespace) -> int:
    from ..recipe import train_from_file

    items = list(args.args)
    quickstart = args.quickstart or not items or ("=" in items[0] and not os.path.isfile(items[0]))
    path, overrides = (None, items) if quickstart else (items[0], items[1:])
    result = train_from_file(path, overrides, dry=args.dry_run, eval_before=not args.no_eval_before)
    if getattr(result, "is_main_process", True) and _is_main_process():  # torchrun: rank 0 prints
        print(result.text())
    return 0


def _is_main_process() -> bool:
    from ..train.runtime import process_state

    return process_state().is_main_process


def _preview(args: argparse.Namespace) -> int:
    from ..recipe import preview_file

    report = preview_file(args.config, args.overrides, n=args.n, split=args.split,
                          style="color" if args.color else "brackets")
    print(report.text())
    if not report.ok:
        print(f"preview failed: {len(report.problems)} problem(s), see 'problem:' lines above", file=sys.stderr)
        return EXIT_PROBLEM
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..recipe import merge_adapter

    report = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype, tolerance=args.tolerance,
                           max_shard_size=args.max_shard_size, requantize=args.requantize)
    print(report.text())
    return 0 if report.ok else EXIT_PROBLEM


def _export(args: argparse.Namespace) -> int:
    if args.to:
        if args.out is None:
            raise _UsageError(f"--to {args.to} needs --out FILE")
        if args.max_lora_rank is not None:
            raise _UsageError("--max-lora-rank goes with --check, not --to")
        from ..recipe.export import export_adapter

        print(export_adapter(args.adapter, args.to, args.out, base=args.base, dtype=args.dtype).text())
        return 0
    if args.dtype is not None:
        raise _UsageError("--dtype goes with --to, not --check")
    from ..recipe.serving import check_serving

    report = check_serving(args.adapter, args.check, max_lora_rank=args.max_lora_rank, out=args.out, base=args.base)
    print(report.text())
    return 0 if report.ready else EXIT_PROBLEM


def _generate(args: argparse.Namespace) -> int:
    from ..recipe import generate

    generate(args.adapter, args.prompt, max_new_tokens=args.max_new_tokens, base=args.base,
             temperature=args.temperature, dtype=args.dtype, check_finite=not args.allow_nonfinite,
             input_text=args.input_text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..recipe import evaluate_adapter

    report = evaluate_adapter(args.adapter, args.data, base=args.base, batch_size=args.batch_size,
                              max_length=args.max_length, dtype=args.dtype, check_finite=not args.allow_nonfinite)
    print(report.text())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..recipe import inspect_model

    if args.overrides and not args.config:
        raise _UsageError(f"overrides {args.overrides} need --config")
    report = inspect_model(args.model, args.config, args.overrides, task=args.task)
    print(report.text())
    return 0 if report.ok else EXIT_PROBLEM


# Where each command collects KEY=VALUE overrides.
OVERRIDE_ARGS = {"train": "args", "preview": "overrides", "inspect": "overrides"}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse stops filling a positional list at the first option; `train c.yaml --dry-run k=v`
    must still collect `k=v`, so overrides after options are gathered here."""
    args, extra = parser.parse_known_args(argv)
    target = OVERRIDE_ARGS.get(args.command)
    stray = [item for item in extra if target is None or item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if target is not None:
        setattr(args, target, list(getattr(args, target)) + extra)
    return args


COMMANDS = {"train": _train, "preview": _preview, "merge": _merge, "generate": _generate, "eval": _eval,
            "inspect": _inspect, "export": _export}


class _UsageError(ValueError):
    pass


def _usage_errors() -> tuple[type, ...]:
    from ..config import ConfigError
    from ..data import DataError
    from ..recipe import ConfigFileError, RunConfigError
    from ..recipe.inference import InputFieldError
    from ..recipe.loading import ModelPathError
    from ..train import TrainConfigError

    return (_UsageError, RunConfigError, ConfigFileError, ConfigError, DataError, TrainConfigError, ModelPathError,
            InputFieldError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback or os.environ.get("PEFTKIT_TRACEBACK"):
            raise
        message, code = error_line(exc, args.command)
        print(message, file=sys.stderr)
        return code


# What to lower when a command other than a run runs out of memory.
OUT_OF_MEMORY_ADVICE = {
    "eval": "lower --batch-size or --max-length, or load the weights in --dtype bf16",
    "generate": "lower --max-new-tokens, or load the weights in --dtype bf16",
    "merge": "write the merged weights in --dtype bf16 (or fp16)",
}


def error_line(exc: BaseException, command: str | None = None) -> tuple[str, int]:
    """The one line `peftkit` prints for an error, and its exit status.

    Config and command-line mistakes exit 2; anything else that stops a command exits 1. An
    error peftkit did not expect (a bug, or a library failing deep inside) still gets one line,
    with the hint to rerun with --traceback for the full one.
    """
    from ..recipe.memory import describe_out_of_memory, is_out_of_memory

    if isinstance(exc, _usage_errors()):
        return f"error: {_message(exc)}", EXIT_USAGE
    if is_out_of_memory(exc):
        advice = OUT_OF_MEMORY_ADVICE.get(command or "")
        return f"error: {describe_out_of_memory(exc, advice=advice) if advice else describe_out_of_memory(exc)}", \
            EXIT_PROBLEM
    if isinstance(exc, (ValueError, OSError, ImportError, NotImplementedError)) or _is_peftkit_error(exc):
        return f"error: {_message(exc)}", EXIT_PROBLEM
    return (f"error: unexpected {type(exc).__name__}: {_message(exc)} (rerun with --traceback for the full "
            "traceback, and please report it)"), EXIT_PROBLEM


def _is_peftkit_error(exc: BaseException) -> bool:
    """peftkit's own run-time errors (CheckpointError, NonFiniteLossError, ...) carry a complete message."""
    return type(exc).__module__.split(".")[0] == "peftkit"


def _message(exc: BaseException) -> str:
    """The message of `exc` (its type when it has none). peftkit's messages are one line, except a
    config's list of problems, one indented line each under the first."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # str(KeyError) quotes its key only
        text = f"{type(exc).__name__}: {exc.args[0]!r}"
    return text


if __name__ == "__main__":
    sys.exit(main())
