"""Base adapter config: a dataclass that reads and writes PEFT's `adapter_config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from .atomic_files import atomic_write_text


class TaskType:
    """Task names as PEFT spells them (plain strings, so JSON stays identical)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    ALL = (CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION)


CONFIG_NAME = "adapter_config.json"

# The label of a position that is not trained (torch cross-entropy's ignore_index), shared by
# the data pipeline, the losses and the chunked lm_head loss.
IGNORE_INDEX = -100

# Fields PEFT writes that carry no meaning for the methods peftkit implements (or that are
# only informational). Any other unknown field with a non-empty value is refused on load,
# because silently dropping it could change the adapter's outputs.
_INFORMATIONAL_FIELDS = {
    "peft_version", "revision", "auto_mapping", "megatron_core", "megatron_config",
    "qalora_group_size", "loftq_config", "ensure_weight_tying", "runtime_config",
}


class ConfigError(ValueError):
    """A config holds one or more invalid values; the message lists every one."""


@dataclass
class PeftConfig:
    """Fields every adapter method shares. Subclasses set `peft_type` and add their own."""

    peft_type: ClassVar[str] = ""
    # peft_type -> config class, filled as each method's config class is defined, so that
    # from_dict finds a saved adapter's class without importing the methods (a layer above).
    _classes: ClassVar[dict[str, type]] = {}
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.peft_type:
            PeftConfig._classes.setdefault(cls.peft_type, cls)  # a user's subclass does not replace the method's

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"Invalid {type(self).__name__}:\n- " + "\n- ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid value, as readable sentences (empty when valid)."""
        out = []
        if self.task_type is not None and self.task_type not in TaskType.ALL:
            out.append(f"task_type={self.task_type!r} is not one of {list(TaskType.ALL)} (or None)")
        return out

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in data.items():
            if isinstance(value, (set, tuple)):
                data[key] = sorted(value) if isinstance(value, set) else list(value)
        data["peft_type"] = self.peft_type
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build the config class named by `data["peft_type"]` (or `cls` itself)."""
        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.peft_type
        target_cls = cls
        if peft_type and peft_type != cls.peft_type:
            if peft_type not in PeftConfig._classes:
                raise ConfigError(f"Unknown peft_type {peft_type!r}; peftkit supports {sorted(PeftConfig._classes)}")
            target_cls = PeftConfig._classes[peft_type]
        known = {f.name for f in dataclasses.fields(target_cls)}
        unsupported = [
            f"{key}={value!r}"
            for key, value in data.items()
            if key not in known and key not in _INFORMATIONAL_FIELDS and value not in (None, False, {}, [], "")
        ]
        if unsupported:
            raise ConfigError(
                f"{target_cls.__name__} does not support {', '.join(sorted(unsupported))}; "
                f"supported fields: {sorted(known)}"
            )
        return target_cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PeftConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            present = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
            where = f"folder contains {present}" if present is not None else "folder does not exist"
            raise FileNotFoundError(f"No {CONFIG_NAME} in {str(directory)!r} ({where}); expected a saved adapter folder")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "peft_type" not in data:
            raise ConfigError(f"{path} has no 'peft_type' field; it is not an adapter config")
        return cls.from_dict(data)

