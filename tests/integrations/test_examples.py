"""The training examples run as scripts, and the adapter each saves reloads with the loss it printed."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = ["train_with_trainer", "train_plain_pytorch", "train_with_accelerate"]
MAX_STEPS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every example at once (each on one thread) and collect (returncode, output, adapter dir)."""
    root = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {}
    for name in EXAMPLES:
        out = root / name / "adapter"
        cmd = [sys.executable, str(EXAMPLES_DIR / f"{name}.py"), "--max-steps", str(MAX_STEPS), "--out", str(out)]
        procs[name] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True), out)
    results = {}
    for name, (proc, out) in procs.items():
        output, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, output, out)
    return results


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed(output: str, label: str) -> float:
    match = re.search(rf"^{label}: ([0-9.]+)$", output, re.MULTILINE)
    assert match, f"no '{label}' line in the output:\n{output}"
    return float(match.group(1))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_and_its_adapter_reloads(name, runs):
    returncode, output, out = runs[name]
    assert returncode == 0, output
    start, end = printed(output, "eval loss at start"), printed(output, "eval loss at end")
    assert end < start - 0.5
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(out))

    example = load_example(name)
    rows = example.make_rows(16, seed=2)
    ids = torch.tensor(rows["input_ids"]) if isinstance(rows, dict) else rows
    with torch.no_grad():
        base = example.build_model().eval()
        assert base(input_ids=ids, labels=ids).loss.item() == pytest.approx(start, abs=1e-5)
        model = peftkit.PeftModel.from_pretrained(example.build_model(), str(out)).eval()
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(end, abs=1e-5)
