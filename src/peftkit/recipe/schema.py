"""The run config of `peftkit train`: sections model / adapter / data / train, validated as a whole.

Every problem in every section is collected before anything is reported, and an unknown
key comes with the nearest valid one (or the section it belongs to).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..config import PeftConfig
from ..data import DataConfig
from ..data.tasks import TASKS, task_type_of
from ..methods import all_methods
from ..train import TrainConfig, TrainConfigError
from ..train.config import LOOP_TASKS
from .quantization import QuantizationConfig
from .yamlio import apply_overrides, dump_yaml, load_yaml_file

SECTIONS = ("model", "adapter", "data", "train")
MODEL_TASKS = TASKS
DTYPES = ("auto", "fp32", "bf16", "fp16")
# Adapter fields peftkit fills in itself (from model.task and model.path).
MANAGED_ADAPTER_FIELDS = ("task_type", "base_model_name_or_path", "inference_mode")
# Keys under which a path read from a config file is resolved against the file's folder.
_FILE_RELATIVE = (("model", "path"), ("model", "tokenizer"), ("data", "path"), ("data", "eval_path"))
# Names other tools use for a setting, mapped to peftkit's; difflib alone would not find them.
_ALIASES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
    "output": "output_dir", "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target": "target_modules",
    "targets": "target_modules", "model_name_or_path": "path", "seq_len": "max_length", "sequence_len": "max_length",
    "max_seq_length": "max_length", "dataset": "path", "train_file": "path", "eval_file": "eval_path",
    "torch_dtype": "dtype", "peft_type": "method", "type": "method",
}


class RunConfigError(ValueError):
    """A run config with one or more problems; `problems` lists each one."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"invalid run config{where} ({count}):\n  - " + "\n  - ".join(problems))


@dataclass
class ModelConfig:
    """The `model:` section.

    path:              a local model folder or a Hugging Face hub id.
    task:              causal-lm | seq-cls | seq2seq | token-cls.
    dtype:             weights' dtype: auto (fp32 on CPU, the checkpoint's dtype on a GPU), fp32, bf16, fp16.
    trust_remote_code: allow the model folder's own Python code (transformers' flag).
    tokenizer:         a tokenizer folder or hub id when it is not next to the model (default: path).
    quantization:      load the linear layers in 4 or 8 bits (QLoRA): bits, type, double_quant,
                       compute_dtype, backend, block_size (`recipe.quantization.QuantizationConfig`).
    """

    path: str | None = None
    task: str = "causal-lm"
    dtype: str = "auto"
    trust_remote_code: bool = False
    tokenizer: str | None = None
    quantization: dict | None = None

    @property
    def quantization_config(self) -> QuantizationConfig | None:
        return None if self.quantization is None else QuantizationConfig.from_dict(self.quantization)[0]

    def problems(self) -> list[str]:
        out = []
        if self.path is None or self.path == "":
            out.append("model.path: not set; give a local model folder or a hub id")
        elif not isinstance(self.path, str):
            out.append(f"model.path: {self.path!r} is not a folder path or hub id (a string)")
        else:
            problem = model_path_problem(self.path)
            out += [f"model.path: {problem}"] if problem else []
        if isinstance(self.tokenizer, str) and self.tokenizer:
            problem = model_path_problem(self.tokenizer, need_config=False)
            out += [f"model.tokenizer: {problem}"] if problem else []
        if self.task not in MODEL_TASKS:
            out.append(f"model.task: {self.task!r} is not accepted; accepted: {', '.join(MODEL_TASKS)}")
        if self.dtype not in DTYPES:
            out.append(f"model.dtype: {self.dtype!r} is not accepted; accepted: {', '.join(DTYPES)}")
        if not isinstance(self.trust_remote_code, bool):
            out.append(f"model.trust_remote_code: {self.trust_remote_code!r} is not a boolean; use true or false")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            out.append(f"model.tokenizer: {self.tokenizer!r} is not a folder or hub id; "
                       "leave it unset to use model.path")
        if self.quantization is not None:
            out += QuantizationConfig.from_dict(self.quantization)[1]
        return out


def looks_like_local_path(path: str) -> bool:
    """A path that cannot be a hub id ("name" or "namespace/name"), so it must exist here."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
            or (os.sep == "\\" and "\\" in path))


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_path_problem(path: str, need_config: bool = True) -> str | None:
    """Why `path` cannot be a model (or, without `need_config`, a tokenizer) folder or hub id;
    None when it may be one. Checked before anything is loaded, so the message names the folder
    instead of the loader's guess ("Repo id must be ...", a sentencepiece error)."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if need_config and not os.path.isfile(os.path.join(expanded, "config.json")):
            present = sorted(os.listdir(expanded))
            shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") if present else "nothing"
            return (f"{path!r} is not a transformers model folder: it has no config.json (it holds {shown}); "
                    "point it at the folder that save_pretrained wrote")
        return None
    if os.path.exists(expanded):
        return f"{path!r} is a file; give the model folder (holding config.json), or a hub id"
    if looks_like_local_path(path):
        return f"folder {path!r} does not exist (and it is not a hub id of the form 'name' or 'namespace/name')"
    if offline() and not _in_hub_cache(path):
        return (f"{path!r} is not a local folder, and as a hub id it cannot be downloaded: HF_HUB_OFFLINE is set. "
                "Give a local model folder, or unset HF_HUB_OFFLINE to download it")
    return None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or isinstance(
            try_to_load_from_cache(repo_id, "tokenizer_config.json"), str)
    except Exception:  # not a valid repo id for the cache either
        return False


@dataclass
class RunConfig:
    """A whole fine-tuning run. `adapter` is the method's config class (LoraConfig, IA3Config, ...)."""

    model: ModelConfig
    method: str  # registry name, lower case: "lora", "ia3", "prompt_tuning", ...
    adapter: PeftConfig
    data: DataConfig
    train: TrainConfig
    source: str | None = None  # the config file, for messages

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | None = None) -> "RunConfig":
        """Validate every section; raise one `RunConfigError` listing all problems."""
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise RunConfigError([f"the config is a {type(raw).__name__}, expected a mapping of sections"], source)
        for key in raw:
            if key not in SECTIONS:
                problems.append(_unknown_section(key))
        sections = {}
        for name in SECTIONS:
            value = raw.get(name)
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{name}: {value!r} is not a section; expected a mapping of {name} settings")
                value = {}
            sections[name] = value

        model = _build(ModelConfig, sections["model"], "model", problems)
        method, adapter = _build_adapter(sections["adapter"], model, problems)
        data = _build(DataConfig, sections["data"], "data", problems)
        train = _build_train(sections["train"], problems)
        if isinstance(model.task, str) and train.task not in ("auto", _train_task(model.task)):
            problems.append(f"train.task: {train.task!r} contradicts model.task {model.task!r}; remove train.task")
        if model.task in ("seq-cls", "seq2seq", "token-cls") and data.packing is True:
            problems.append(f"data.packing: packing is only for causal-lm, not model.task {model.task!r}")
        if data.label_all_subwords is True and model.task != "token-cls":
            problems.append(f"data.label_all_subwords: only for model.task token-cls, not {model.task!r}")
        if problems:
            raise RunConfigError(problems, source)
        return cls(model=model, method=method, adapter=adapter, data=data, train=train, source=source)

    def adapter_fields(self) -> dict[str, Any]:
        """The adapter section as a user writes it: `method` and the method's own fields."""
        values = {f.name: getattr(self.adapter, f.name) for f in dataclasses.fields(self.adapter)}
        for name in MANAGED_ADAPTER_FIELDS:
            values.pop(name, None)
        return {"method": self.method, **values}

    def to_dict(self) -> dict[str, Any]:
        """Every setting, defaults included (what `run_config.yaml` holds)."""
        return {
            "model": dataclasses.asdict(self.model),
            "adapter": self.adapter_fields(),
            "data": self.data.to_dict(),
            "train": self.train.to_dict(),
        }

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @property
    def task(self) -> str:
        return self.model.task


def load_run_config(path: str, overrides: list[str] = (),
                    fill: Callable[[dict[str, Any]], None] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate.

    Relative paths under model.path / model.tokenizer / data.path / data.eval_path in the FILE are
    resolved against the file's folder when they exist there; override values are relative to
    the working directory, like any shell argument. `fill(raw)` may set values still missing
    after the overrides (the quickstart's bundled model path).
    """
    raw = load_yaml_file(path)
    resolve_relative_paths(raw, os.path.dirname(os.path.abspath(path)))
    raw = apply_overrides(raw, list(overrides))
    _alias_method_section(raw)
    if fill is not None:
        fill(raw)
    return RunConfig.from_dict(raw, source=path)


def resolve_relative_paths(raw: dict[str, Any], folder: str) -> None:
    """In place: relative file paths that exist under `folder` become absolute."""
    for section, key in _FILE_RELATIVE:
        values = raw.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values[key]
        if isinstance(value, str):
            values[key] = _resolve(value, folder)
        elif isinstance(value, list):
            values[key] = [_resolve(v, folder) if isinstance(v, str) else v for v in value]


def _resolve(value: str, folder: str) -> str:
    if not value or os.path.isabs(value):
        return value
    candidate = os.path.join(folder, value)
    return os.path.abspath(candidate) if os.path.exists(candidate) else value


def _alias_method_section(raw: dict[str, Any]) -> None:
    """`lora.r=32` on the command line means `adapter.r=32` when the adapter is LoRA."""
    adapter = raw.get("adapter") if isinstance(raw.get("adapter"), dict) else {}
    method = str(adapter.get("method", "lora")).lower().replace("-", "_")
    if method in raw and method not in SECTIONS and isinstance(raw[method], dict):
        merged = dict(adapter)
        merged.update(raw.pop(method))
        raw["adapter"] = merged


def _train_task(model_task: str) -> str:
    return model_task if model_task in LOOP_TASKS else "auto"


# --- building sections ----------------------------------------------------------------


def _build(cls: type, values: dict[str, Any], section: str, problems: list[str]) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    problems += [_unknown_key(section, key, names) for key in values if key not in names]
    config = cls(**{k: v for k, v in values.items() if k in names})
    problems += [p if p.startswith(f"{section}.") else f"{section}: {p}" for p in config.problems()]
    return config


def _build_train(values: dict[str, Any], problems: list[str]) -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    problems += [_unknown_key("train", key, names) for key in values if key not in names]
    known = {k: v for k, v in values.items() if k in names}
    resume = known.get("resume_from")
    if isinstance(resume, str) and resume not in ("latest", "") and not os.path.exists(os.path.expanduser(resume)):
        problems.append(f"train.resume_from: checkpoint folder {resume!r} does not exist; give a checkpoint-N "
                        "folder of an earlier run, or latest (the newest checkpoint in train.output_dir)")
    try:
        return TrainConfig.from_dict(known)
    except TrainConfigError as exc:
        problems += [f"train.{p}" for p in exc.problems]
        return TrainConfig()


def method_names() -> dict[str, str]:
    """User-facing method name -> peft_type, for every registered method."""
    return {peft_type.lower(): peft_type for peft_type in all_methods()}


def _build_adapter(values: dict[str, Any], model: ModelConfig, problems: list[str]) -> tuple[str, PeftConfig]:
    from ..methods.lora import LoraConfig

    names = method_names()
    raw_method = values.get("method", "lora")
    method = str(raw_method).lower().replace("-", "_")
    if method not in names:
        close = difflib.get_close_matches(method, list(names), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        accepted = ", ".join(sorted(names))
        problems.append(f"adapter.method: {raw_method!r} is not a known method{hint}; accepted: {accepted}")
        return "lora", LoraConfig()  # a placeholder: the caller raises with the problems
    config_cls = all_methods()[names[method]].config_cls
    fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in MANAGED_ADAPTER_FIELDS]
    for key in values:
        if key == "method":
            continue
        if key in MANAGED_ADAPTER_FIELDS:
            problems.append(f"adapter.{key}: set by peftkit from model.task and model.path; remove it")
        elif key not in fields:
            problems.append(_unknown_key("adapter", key, fields + ["method"], f"{config_cls.__name__} fields"))
    kwargs = {k: v for k, v in values.items() if k in fields}
    kwargs["task_type"] = task_type_of(model.task) if model.task in TASKS else None
    value_problems = _module_name_problems(kwargs) or _unvalidated_problems(config_cls, kwargs)
    if value_problems:
        problems += [f"adapter.{p}" for p in value_problems]
        return method, LoraConfig()  # a placeholder: the caller raises with the problems
    return method, config_cls(**kwargs)


# Adapter fields that select modules by name: a list of names, or one full-match regex.
MODULE_NAME_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "feedforward_modules")


def _module_name_problems(kwargs: dict[str, Any]) -> list[str]:
    """Module selectors must be strings (a number would silently match a layer index such as
    `layers.1`), and a regex string must compile."""
    out = []
    for name in MODULE_NAME_FIELDS:
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if not isinstance(v, str) or not v]
            if bad:
                out.append(f"{name}: entries {bad!r} are not module names; {name} entries must be strings "
                           "(last names such as q_proj, or full module paths)")
        elif not isinstance(value, str):
            out.append(f"{name}: {value!r} is not accepted; give a list of module names, a regex string"
                       + (" or 'all-linear'" if name == "target_modules" else ""))
        elif name in ("target_modules", "exclude_modules") and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                out.append(f"{name}: {value!r} is not a valid regular expression ({exc}); a string {name} is "
                           "matched as a regex against full module paths: give a list of names instead, or fix it")
    return out


def _unvalidated_problems(config_cls: type, kwargs: dict[str, Any]) -> list[str]:
    """`problems()` of the config these values would make, without raising on the first."""
    obj = config_cls.__new__(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[misc]
        object.__setattr__(obj, f.name, value)
    try:
        return obj.problems()
    except Exception as exc:  # a check that trips over a wrongly typed value
        shown = {k: v for k, v in kwargs.items() if k != "task_type"}
        return [f"invalid values {shown}: {type(exc).__name__}: {exc}"]


# --- unknown keys -----------------------------------------------------------------------


def section_keys() -> dict[str, list[str]]:
    """Valid keys per section (the adapter's are LoRA's plus `method`; other methods add theirs)."""
    from ..methods.lora import LoraConfig

    return {
        "model": [f.name for f in dataclasses.fields(ModelConfig)],
        "adapter": ["method"] + [f.name for f in dataclasses.fields(LoraConfig)
                                 if f.name not in MANAGED_ADAPTER_FIELDS],
        "data": [f.name for f in dataclasses.fields(DataConfig)],
        "train": [f.name for f in dataclasses.fields(TrainConfig)],
    }


def _unknown_key(section: str, key: Any, valid: list[str], what: str | None = None) -> str:
    text = str(key)
    hint = _suggest(text, valid)
    if hint:
        return f"{section}.{text}: unknown key; did you mean {section}.{hint}?"
    for other, keys in section_keys().items():
        target = text if text in keys else _ALIASES.get(text)
        if other != section and target in keys:
            return f"{section}.{text}: unknown key; {target!r} is a {other} setting: did you mean {other}.{target}?"
    return f"{section}.{text}: unknown key; accepted {what or section + ' keys'}: {', '.join(valid)}"


def _suggest(key: str, valid: list[str]) -> str | None:
    alias = _ALIASES.get(key.lower())
    if alias in valid:
        return alias
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_section(key: Any) -> str:
    text = str(key)
    close = difflib.get_close_matches(text, SECTIONS, n=1, cutoff=0.5)
    if close:
        return f"{text}: unknown section; did you mean {close[0]}?"
    if text.lower() in method_names():
        return f"{text}: unknown section; adapter settings go under adapter: (with method: {text.lower()})"
    for section, keys in section_keys().items():
        target = text if text in keys else _ALIASES.get(text)
        if target in keys:
            return f"{text}: unknown section; {target!r} is a {section} setting: did you mean {section}.{target}?"
    return f"{text}: unknown section; accepted sections: {', '.join(SECTIONS)}"
