"""Loading what a run needs: the tokenizer, the model for its task (real or on the meta
device), the adapter config, and an adapter folder back onto its base model."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..config import PeftConfig
from ..data.tasks import accepted_task_types, task_of_class_names, task_of_task_type, task_type_of
from .quantization import load_quantized_model
from .schema import ModelConfig, RunConfig

LABELS_FILE = "labels.json"
# Files a saved tokenizer consists of; any of them beside an adapter means one was saved there.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "special_tokens_map.json")
RUN_CONFIG_FILE = "run_config.yaml"
# Tasks whose model gets a new classifier head sized from the data's labels (saved as labels.json).
CLASSIFIER_TASKS = ("seq-cls", "token-cls")


class LoadError(ValueError):
    """A model, tokenizer or adapter folder that cannot be loaded; says what was tried."""


class ModelPathError(LoadError):
    """A model path that names no model: a missing folder, a folder without config.json, or a
    hub id that cannot be downloaded offline (a usage error: the path given is wrong)."""


def check_model_path(path: str, what: str, error: type[LoadError] = ModelPathError) -> None:
    """Raise `error` naming `what` (e.g. "--base") when `path` cannot be a model."""
    from .schema import model_path_problem

    problem = model_path_problem(path)
    if problem:
        raise error(f"{what}: {problem}")


def auto_class(task: str) -> Any:
    import transformers

    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "token-cls": transformers.AutoModelForTokenClassification,
    }
    if task not in classes:
        raise LoadError(f"task {task!r} has no model class; accepted: {', '.join(classes)}")
    return classes[task]


def torch_dtype(name: str) -> torch.dtype | str:
    """model.dtype -> what `from_pretrained(dtype=...)` takes. auto: fp32 on CPU (CPU kernels
    are fast and exact in fp32), the checkpoint's own dtype on a GPU."""
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_tokenizer(model: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    where = model.tokenizer or model.path
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load a tokenizer from {where!r} (model.tokenizer or model.path): {exc}") from None


def load_model(model: ModelConfig, labels: list[str] | None = None) -> torch.nn.Module:
    """The pretrained model for `model.task`; seq-cls and token-cls get a (new) head for `labels`."""
    kwargs = dict(trust_remote_code=model.trust_remote_code, **_dtype_kwarg(torch_dtype(model.dtype)))
    kwargs.update(_label_kwargs(model.task, labels))
    try:
        # A classifier head is new by design; transformers' "newly initialized" report would only alarm.
        with _quiet_transformers(model.task in CLASSIFIER_TASKS):
            if model.quantization is not None:
                dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
                dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16  # "auto" on a GPU
                return load_quantized_model(model.path, model.quantization_config, model_class=auto_class(model.task),
                                            dtype=dtype, **kwargs)
            return auto_class(model.task).from_pretrained(model.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load a {model.task} model from {model.path!r} (model.path): {exc}") from None


def meta_model(model: ModelConfig, labels: list[str] | None = None) -> torch.nn.Module:
    """The model built from its config.json on the meta device: shapes only, no weights read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model.path, trust_remote_code=model.trust_remote_code, **_label_kwargs(model.task, labels)
        )
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read the model config at {model.path!r} (model.path): {exc}") from None
    with torch.device("meta"):
        return auto_class(model.task).from_config(config, trust_remote_code=model.trust_remote_code)


def _label_kwargs(task: str, labels: list[str] | None) -> dict[str, Any]:
    if task not in CLASSIFIER_TASKS or not labels:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


@contextlib.contextmanager
def _quiet_transformers(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def adapter_config(config: RunConfig) -> PeftConfig:
    """The run's adapter config, with the task and base model filled in."""
    adapter = copy.deepcopy(config.adapter)
    adapter.task_type = task_type_of(config.task)
    adapter.base_model_name_or_path = config.model.path
    return adapter


def model_task(peft_config: PeftConfig, base_path: str | None) -> str:
    """The task of a saved adapter: its task_type, else guessed from the base model's architecture."""
    # The adapter's own task_type comes first: a classifier adapter often sits on a base whose
    # architectures name a causal LM (the head was added for training).
    task = task_of_task_type(peft_config.task_type)
    if task is not None:
        return task
    if peft_config.task_type not in (None, ""):
        raise LoadError(
            f"adapter task_type {peft_config.task_type!r} is not one peftkit's commands handle; "
            f"accepted: {', '.join(accepted_task_types())}"
        )
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(base_path), "architectures", None) or []
    task = task_of_class_names(architectures)
    if task is None:
        raise LoadError(
            f"the adapter has no task_type and the base model's architectures {architectures} do not tell the task; "
            f"set task_type in adapter_config.json to one of {accepted_task_types()}"
        )
    return task


@dataclass
class LoadedAdapter:
    """An adapter folder attached to its base model, ready for inference."""

    model: Any  # PeftModel
    tokenizer: Any | None
    task: str
    base_path: str
    adapter_dir: str
    labels: list[str] | None
    run_config: dict[str, Any] | None  # the run_config.yaml beside the adapter, if any


def load_adapter(adapter_dir: str, base: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, check_finite: bool = True) -> LoadedAdapter:
    """Load `adapter_dir` onto its base model (`base`, else the adapter's base_model_name_or_path);
    `check_finite=False` loads an adapter holding NaN / Inf (to inspect it) instead of refusing it."""
    from ..model import PeftModel

    peft_config = PeftConfig.from_pretrained(adapter_dir)
    base_path = base or peft_config.base_model_name_or_path
    if not base_path:
        raise LoadError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; pass --base MODEL")
    if base:
        check_model_path(base, "--base")
    else:  # the path recorded in the adapter's folder, not one the user typed: a run failure
        check_model_path(base_path, f"the base model of {adapter_dir} (base_model_name_or_path in "
                         "adapter_config.json; pass --base MODEL to use another)", LoadError)
    task = model_task(peft_config, base_path)
    labels = read_labels(adapter_dir, task)
    run_config = None
    path = os.path.join(adapter_dir, RUN_CONFIG_FILE)
    if os.path.isfile(path):
        from .yamlio import load_yaml_file

        run_config = load_yaml_file(path)
    # An adapter trained on a quantized base is used on that base, quantized the same way: it
    # learned to correct those weights (merge then dequantizes them: PeftModel.merge_and_unload).
    model_section = (run_config or {}).get("model") if isinstance(run_config, dict) else None
    quantization = model_section.get("quantization") if isinstance(model_section, dict) else None
    model_config = ModelConfig(path=base_path, task=task, dtype=dtype, trust_remote_code=trust_remote_code,
                               quantization=quantization)
    if quantization is not None and (problems := model_config.problems()):
        raise LoadError(f"{path}: " + "; ".join(problems))
    model = load_model(model_config, labels)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, check_finite=check_finite)
    peft_model.eval()
    tokenizer = _adapter_tokenizer(adapter_dir, base_path, trust_remote_code)
    return LoadedAdapter(peft_model, tokenizer, task, base_path, adapter_dir, labels, run_config)


def _adapter_tokenizer(adapter_dir: str, base_path: str, trust_remote_code: bool) -> Any | None:
    """The tokenizer saved beside the adapter, else the base model's, else None (merge needs none;
    generate and eval refuse without one)."""
    from transformers import AutoTokenizer

    saved = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(adapter_dir, name))]
    if saved:
        try:
            return AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as exc:
            # An error, not a fall-back: training saved this tokenizer because it can differ from the
            # base's (pad token, chat template), and the base's would silently change outputs and scores.
            raise LoadError(
                f"the tokenizer saved in {adapter_dir} ({', '.join(saved)}) does not load: {type(exc).__name__}: "
                f"{exc}. Repair those files, or remove them to use the base model's tokenizer ({base_path})"
            ) from None
    try:
        return AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        # A warning, not an error: merge works without a tokenizer (the merged folder then has none).
        warnings.warn(f"no tokenizer: {adapter_dir} has none and the base model's ({base_path}) does not load: "
                      f"{type(exc).__name__}: {exc}", stacklevel=3)
        return None


def write_labels(folder: str, labels: list[str]) -> None:
    from ..atomic_files import atomic_write_text

    atomic_write_text(os.path.join(folder, LABELS_FILE), json.dumps({"labels": labels}, indent=2) + "\n")


def read_labels(adapter_dir: str, task: str) -> list[str] | None:
    """Class names saved beside a seq-cls / token-cls adapter, else as many generic names as its
    head has rows."""
    if task not in CLASSIFIER_TASKS:
        return None
    path = os.path.join(adapter_dir, LABELS_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return list(json.load(fh)["labels"])
    from safetensors import safe_open

    from ..checkpoint import SAFETENSORS_NAME

    with safe_open(os.path.join(adapter_dir, SAFETENSORS_NAME), framework="pt") as fh:
        for key in fh.keys():
            if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")):
                return [f"LABEL_{i}" for i in range(fh.get_slice(key).get_shape()[0])]
    return None

