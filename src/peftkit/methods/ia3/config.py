"""IA3Config: PEFT's field names, defaults and JSON spelling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftConfig


def _sorted_if_collection(value):
    return sorted(value) if isinstance(value, (set, tuple)) else value


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: learned vectors that rescale a layer's output, or its input for feedforward modules.

    `target_modules`: list of names (exact or `.name` suffix), a full-match regex string, or
    "all-linear"; None picks the architecture's default. `feedforward_modules`: the targets whose
    *input* is scaled (a list, matched as a plain suffix of the module path, or a full-match regex);
    None picks the architecture's default. A list must be a subset of a `target_modules` list.

    PEFT's IA3Config has no `layers_to_transform`; peftkit leaves it out too, because PEFT would
    silently ignore it and adapt every layer when loading a peftkit adapter.
    """

    peft_type: ClassVar[str] = "IA3"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.target_modules = _sorted_if_collection(self.target_modules)
        self.exclude_modules = _sorted_if_collection(self.exclude_modules)
        self.feedforward_modules = _sorted_if_collection(self.feedforward_modules)
        super().__post_init__()

    def problems(self) -> list[str]:
        out = super().problems()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) or
                                          (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                out.append(f"{name}={value!r} must be a list of module names or a regex string (or None)")
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list):
            extra = sorted(set(feedforward) - set(targets))
            if extra:
                out.append(f"feedforward_modules={feedforward!r} must be a subset of target_modules={targets!r}; "
                           f"not targeted: {extra}")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            out.append(f"modules_to_save={self.modules_to_save!r} must be a list of module names (or None)")
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name}={getattr(self, name)!r} must be True or False")
        return out
