"""Runs from one config file: the schema, the orchestration of a fine-tune, and the commands
that use its output (generate, eval, merge, inspect). `peftkit.cli` is argument parsing on top.

    from peftkit.recipe import load_run_config, run_training
    result = run_training(load_run_config("examples/chat_sft.yaml", ["train.lr=1e-4"]))
"""

from .inference import EvalReport, evaluate_adapter, generate
from .inspect import InspectReport, inspect_model
from .loading import LoadedAdapter, LoadError, load_adapter
from .merge import merge_adapter
from .quickstart import quickstart_config
from .run import DryRunReport, RunResult, dry_run, preview_file, run_training, train_from_file
from .schema import ModelConfig, RunConfig, RunConfigError, load_run_config
from .yamlio import ConfigFileError

__all__ = [
    "ConfigFileError",
    "DryRunReport",
    "EvalReport",
    "InspectReport",
    "LoadError",
    "LoadedAdapter",
    "ModelConfig",
    "RunConfig",
    "RunConfigError",
    "RunResult",
    "dry_run",
    "evaluate_adapter",
    "generate",
    "inspect_model",
    "load_adapter",
    "load_run_config",
    "merge_adapter",
    "preview_file",
    "quickstart_config",
    "run_training",
    "train_from_file",
]
