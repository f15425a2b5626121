"""YAML in and out for run configs: numbers like `2e-4` read as numbers, dotted overrides."""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` / `5E3` as floats.

    YAML 1.1 (PyYAML) requires a dot in a float (`1.0e-4`), so `lr: 1e-4` would be the
    string "1e-4"; every learning rate written the usual way would then be a type error.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class ConfigFileError(ValueError):
    """A config file or override that cannot be read (not the values in it)."""


def load_yaml_file(path: str) -> dict[str, Any]:
    """The mapping in YAML file `path` (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigFileError(f"config file {path!r} is a folder; give a .yaml file") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{path} holds a {type(data).__name__}, expected a mapping with sections model, adapter, data, train"
        )
    return data


def parse_scalar(text: str) -> Any:
    """An override value read as YAML: `3` int, `1e-4` float, `true`, `null`, `[a, b]` list, else the text."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `raw` with each `section.key[.sub]=value` set (values parsed by `parse_scalar`);
    `section={...}` replaces a whole section.

    Malformed overrides are reported together; unknown keys are left for validation, which
    reports them with a suggestion like any key read from the file.
    """
    import copy

    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        parsed = parse_scalar(value)
        whole_section = len(parts) == 1 and isinstance(parsed, dict)  # adapter={method: ia3, ...}
        if not sep or not all(parts) or (len(parts) < 2 and not whole_section):
            problems.append(f"override {item!r} is not of the form section.key=value (e.g. train.lr=1e-4) "
                            "or section={key: value, ...}")
            continue
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"override {item!r}: {where} is {child!r}, not a section that holds keys")
                break
            node = child
        else:
            node[parts[-1]] = parsed
    if problems:
        raise ConfigFileError("bad command-line overrides:\n  - " + "\n  - ".join(problems))
    return out


class _Dumper(yaml.SafeDumper):
    """Block style for sections; short lists of scalars inline (`target_modules: [q_proj, v_proj]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
