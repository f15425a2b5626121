"""docs/config.md documents every key a run config accepts (and no key that does not exist)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from peftkit.data import DataConfig
from peftkit.methods import all_methods
from peftkit.recipe.schema import MANAGED_ADAPTER_FIELDS, ModelConfig
from peftkit.train import TrainConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _section(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## `{name}`")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _table_keys(section: str) -> set[str]:
    """Keys named in the first column of a section's tables (a cell may list several)."""
    keys = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    return keys


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_field_is_documented_and_nothing_else(section):
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    documented = _table_keys(_section(section))
    assert fields - documented == set(), f"undocumented {section} keys"
    assert documented - fields == set(), f"docs/config.md lists {section} keys that do not exist"


def test_every_registered_method_and_its_fields_are_documented():
    adapter = _section("adapter")
    documented = _table_keys(adapter)
    for peft_type, method in all_methods().items():
        name = peft_type.lower()
        assert f"`method: {name}`" in adapter, f"adapter method {name} has no section"
        fields = {f.name for f in dataclasses.fields(method.config_cls)} - set(MANAGED_ADAPTER_FIELDS)
        assert fields - documented == set(), f"undocumented {name} fields"
