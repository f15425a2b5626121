"""Hostile run configs: an alias bomb, a recursive alias, an oversized file, a key given twice;
each refused with one line naming the file and line, before anything is loaded (exit 2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.cli.main import main as peftkit_main
from peftkit.recipe.yamlio import MAX_CONFIG_BYTES, ConfigFileError, load_yaml_file


def billion_laughs(path: Path) -> Path:
    """Nine levels of nine aliases each: 9^9 (387 million) strings once expanded, in 600 bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = peftkit_main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_an_alias_bomb_is_refused(tmp_path, capsys):
    path = billion_laughs(tmp_path / "run.yaml")
    assert path.stat().st_size < 1024
    with pytest.raises(ConfigFileError, match=r"run.yaml line 6: the YAML expands to more than 100000 values "
                                              r"through anchors and aliases"):
        load_yaml_file(str(path))
    code, err = run_cli(capsys, "train", str(path), "--dry-run")
    assert code == 2 and err.startswith("error: ") and "expands to more than 100000 values" in err


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: &m\n  path: x\n  again: *m\n")
    with pytest.raises(ConfigFileError, match=r"run.yaml line 1: an alias refers to the node that contains it"):
        load_yaml_file(str(path))


def test_an_oversized_config_is_refused_unread(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigFileError, match=rf"is {path.stat().st_size} bytes; a run config is at most "
                                              rf"{MAX_CONFIG_BYTES} bytes"):
        load_yaml_file(str(path))


def test_a_duplicate_key_is_an_error_naming_key_and_lines(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: x\ntrain:\n  lr: 1e-4\n  max_steps: 3\n  lr: 2e-4\n")
    with pytest.raises(ConfigFileError, match=r"run.yaml line 6: duplicate key 'lr' \(first set on line 4\); a key "
                                              r"may appear once per section"):
        load_yaml_file(str(path))
    code, err = run_cli(capsys, "train", str(path), "--dry-run")
    assert code == 2 and "duplicate key 'lr'" in err


def test_anchors_within_limits_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &b {r: 4, lora_alpha: 8}\nadapter:\n  <<: *b\n  r: 8\nlist: [*b, *b]\n")
    assert load_yaml_file(str(path)) == {"base": {"r": 4, "lora_alpha": 8}, "adapter": {"r": 8, "lora_alpha": 8},
                                         "list": [{"r": 4, "lora_alpha": 8}] * 2}
