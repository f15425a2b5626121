"""benchmarks/train_step.py at a tiny shape: it runs, writes its JSON, and both sides agree on the loss."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
TINY = ["--hidden", "64", "--layers", "1", "--heads", "2", "--intermediate", "128", "--vocab", "256",
        "--seq", "16", "--batch", "2", "--warmup", "1", "--steps", "2", "--threads", "1", "--dtypes", "fp32"]


def _run(tmp_path, *extra):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_side_by_side_run_reports_times_memory_and_equal_losses(tmp_path):
    data, stdout = _run(tmp_path, "--variants", "lora")
    by_side = {r["spec"]["side"]: r for r in data["results"]}
    assert set(by_side) == {"floor", "peft", "peftkit"}
    for r in by_side.values():
        assert r["s_per_step"] > 0 and r["peak_mb"] > r["model_mb"] * 0.5 and len(r["step_times"]) == 2
    # Same init, same batches, same optimizer: the adapter trains identically on both sides
    # (equal to float rounding), and training moved the loss away from the frozen floor's.
    peft_loss, peftkit_loss, floor_loss = (by_side[s]["loss"] for s in ("peft", "peftkit", "floor"))
    assert abs(peft_loss - peftkit_loss) < 2e-6 < 4e-6 < abs(peft_loss - floor_loss)
    assert by_side["peftkit"]["time_vs_peft"] == by_side["peftkit"]["s_per_step"] / by_side["peft"]["s_per_step"]
    assert "fp32 lora peftkit: time / peft" in stdout


def test_paired_run_steps_the_variants_in_one_process(tmp_path):
    data, stdout = _run(tmp_path, "--paired", "--variants", "lora", "lora+dropout0.1")
    pair = data["paired"]["fp32"]
    assert set(pair) == {"lora", "lora+dropout0.1"}
    assert all(v["s_per_step"] > 0 and len(v["step_times"]) == 2 for v in pair.values())
    assert abs(pair["lora"]["loss"] - pair["lora+dropout0.1"]["loss"]) < 0.05  # same model, dropout aside
    assert "lora+dropout0.1" in stdout
