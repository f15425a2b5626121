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


ROUTES_SCRIPT = SCRIPT.parent / "routes.py"


def test_routes_run_every_route_on_both_sides_with_equal_losses(tmp_path):
    """benchmarks/routes.py at a tiny shape (hidden 32, vocab 128, 1 warm-up + 1 measured step),
    every configuration in one process (--in-process: ~20 s instead of ~10 s of imports per
    fresh process)."""
    import importlib.util

    routes = ["own-loop", "trainer", "plain", "accelerate"] + (["trl"] if importlib.util.find_spec("trl") else [])
    out = tmp_path / "routes.json"
    proc = subprocess.run([sys.executable, str(ROUTES_SCRIPT), "--widths", "tiny", "--dtypes", "fp32", "--warmup", "1",
                           "--steps", "1", "--threads", "1", "--in-process", "--floor", "--routes", *routes,
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by_route: dict = {}
    for r in rows:
        by_route.setdefault(r["route"], {})[r["side"]] = r
    assert set(by_route) == set(routes)
    for route, sides in by_route.items():
        # own-loop's peft side is peft + transformers.Trainer (the trainer route's peft run)
        peft_row = sides["peft (trainer)" if route == "own-loop" else "peft"]
        kit = sides["peftkit"]
        assert peft_row["s_per_step"] > 0 and kit["s_per_step"] > 0, route
        assert len(peft_row["losses"]) == len(kit["losses"]) == 2, route
        assert kit["trainable_params"] == peft_row["trainable_params"], route
        # Same base model, initial adapter, batches and optimizer, all in fp32: the sides differ
        # only in the order of float sums (chunked loss vs full logits, the fused LoRA op), and
        # after one AdamW step (whose first update is ~lr * sign(grad), so a near-zero gradient
        # rounded the other way moves a weight by up to lr) the loss moved by ~5e-7 of 4.88 here.
        # 1e-5 leaves room for that; the step's own effect on the second loss is 4.4e-4 (4.87924
        # with lr 1e-3, 4.87967 with lr 1e-9), so a side whose step went wrong would fail.
        assert abs(kit["first_loss"] - peft_row["first_loss"]) < 1e-5, route
        assert abs(kit["loss"] - peft_row["loss"]) < 1e-5, route
        assert kit["time_vs_peft"] == kit["s_per_step"] / peft_row["s_per_step"]
    assert by_route["own-loop"]["peftkit"]["loss_path"] == "chunked"
    # the floor: the base alone (the initial adapter's B is zero, so its first loss is the adapted
    # model's), timed against plain's peft side, with no target of its own
    floor = by_route["plain"]["base alone"]
    assert floor["trainable_params"] == 0 and floor["loss_path"] == "chunked, no adapter"
    assert abs(floor["first_loss"] - by_route["plain"]["peft"]["first_loss"]) < 1e-5
    assert floor["time_vs_peft"] == floor["s_per_step"] / by_route["plain"]["peft"]["s_per_step"]
    assert "time_met" not in floor and "peak_met" not in floor
    assert by_route["trainer"]["peft"]["loss_path"] == "full logits"


def test_paired_steps_times_the_three_sides_on_the_same_batches():
    """benchmarks/paired_steps.py at the tiny shape: peft, peftkit and the base alone in one
    process; the first losses agree (the initial adapter's B is zero), peftkit's and peft's after
    their optimizer steps too, and each ratio is taken per round."""
    sys.path.insert(0, str(SCRIPT.parent))
    import paired_steps

    r = paired_steps.measure("tiny", "fp32", rounds=2, warmup=1, threads=1)
    first = {side: losses[0] for side, losses in r["losses"].items()}
    assert abs(first["peftkit"] - first["peft"]) < 1e-5 and abs(first["floor"] - first["peft"]) < 1e-5
    assert all(abs(a - b) < 1e-5 for a, b in zip(r["losses"]["peftkit"], r["losses"]["peft"]))
    assert len(r["step_times"]["peft"]) == 2
    for side in ("peftkit", "floor"):
        pairs = r[f"{side}_vs_peft"]["per_round"]
        assert pairs == [a / b for a, b in zip(r["step_times"][side], r["step_times"]["peft"])]
        assert r[f"{side}_vs_peft"]["median"] == (pairs[0] + pairs[1]) / 2
