"""YAML in and out for run configs: numbers like `2e-4` read as numbers, dotted overrides.

Reading is safe against hostile files: only plain data (SafeLoader), at most MAX_CONFIG_BYTES,
at most MAX_EXPANDED_NODES values once anchors/aliases are expanded (a 1 KB "billion laughs"
file would otherwise expand to 10^9 values), no recursive aliases, and no duplicate keys (YAML
keeps the last value silently, so a setting written twice would be half ignored).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KB
MAX_EXPANDED_NODES = 100_000  # values after expanding aliases; a real config has a few hundred


class ConfigFileError(ValueError):
    """A config file or override that cannot be read (not the values in it)."""


class _Refused(yaml.YAMLError):
    """Readable YAML that a run config must not be (an alias bomb, a recursive structure)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` / `5E3` as floats, refuses duplicate keys and caps
    what anchors/aliases expand to.

    YAML 1.1 (PyYAML) requires a dot in a float (`1.0e-4`), so `lr: 1e-4` would be the
    string "1e-4"; every learning rate written the usual way would then be a type error.
    """

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` overrides on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: SafeLoader itself reports it
                if first != key_node.start_mark.line + 1:
                    raise _Refused(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first set on "
                                   f"line {first}); a key may appear once per section")
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document whose values, with every alias expanded, exceed MAX_EXPANDED_NODES
    (or that refers to itself): sizes are counted per node once, so this is linear in the file."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to the node that contains it (a "
                           "recursive structure); a config must be plain nested data")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise _Refused(
                f"line {node.start_mark.line + 1}: the YAML expands to more than {MAX_EXPANDED_NODES} values through "
                "anchors and aliases (&name / *name); refused as a run config (an alias bomb?)")
        sizes[key] = total
        return total

    size(root)


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


def load_yaml_file(path: str) -> dict[str, Any]:
    """The mapping in YAML file `path` (an empty file is an empty mapping)."""
    if os.path.isfile(path) and os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"config file {path!r} is {os.path.getsize(path)} bytes; a run config is at most "
                              f"{MAX_CONFIG_BYTES} bytes (is it the right file?)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigFileError(f"config file {path!r} is a folder; give a .yaml file") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"config file {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except _Refused as exc:
        raise ConfigFileError(f"{path} {exc}") from None
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
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"an override value of {len(text)} characters is longer than {MAX_CONFIG_BYTES}")
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
