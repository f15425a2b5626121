"""benchmarks/quantized.py at a tiny shape: every row runs (peft and peftkit on a 4-bit NF4 base,
both on the bf16 base), writes its JSON, and the sides that compute the same thing agree on the loss."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quantized.py"


def test_quantized_benchmark_runs_every_row_with_matching_losses(tmp_path):
    """hidden 64, 2 layers, vocab 256, batch 2 x 8 tokens, 1 warm-up + 2 measured steps, every
    row in one process (--in-process: ~15 s instead of ~10 s of imports per fresh process)."""
    out = tmp_path / "quantized.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--in-process", "--repeats", "1", "--batch", "2",
                           "--seq", "8", "--warmup", "1", "--steps", "2", "--cache-dir", str(tmp_path / "cache"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"peft:nf4", "peftkit:nf4", "peftkit+prepare:nf4", "peft:bf16", "peftkit:bf16"}
    for key, r in results.items():
        assert "error" not in r, (key, r.get("stderr"))
        assert r["s_per_step"] > 0 and len(r["step_times"]) == 2 and len(r["losses"]) == 3, key
        # r=16 on 7 projections of 2 layers (k/v: 2 KV heads of 16 = 32 outputs):
        # 2 * 16 * ((64+64) + 2*(64+32) + (64+64) + 2*(64+128) + (128+64)) = 32768
        assert r["trainable_params"] == 32768, key
        assert r["trainable_dtypes"] == ["float32"], key
    # peft's QLoRA recipe and peftkit's prepare_model_for_kbit_training compute the same forward
    # (same bitsandbytes layers, norms/embeddings/head upcast to fp32 on both sides; the first loss
    # is equal). The input gradient through a 4-bit layer is a bf16 product on peft's side and fp32
    # on peftkit's (LoRA gradients differ by up to 0.5% at this size), and AdamW's first updates are
    # ~lr * sign(grad): measured last-loss differences 2e-6 to 1.3e-4 of 5.5 between code versions.
    kit, peft = results["peftkit+prepare:nf4"], results["peft:nf4"]
    assert kit["losses"][0] == pytest.approx(peft["losses"][0], abs=1e-5)
    assert kit["loss"] == pytest.approx(peft["loss"], rel=1e-4)
    # bf16 base: the same bf16 computation on both sides (adapter fp32)
    assert results["peftkit:bf16"]["loss"] == pytest.approx(results["peft:bf16"]["loss"], abs=1e-3)
    # peftkit's own recipe keeps norms/embeddings/head in bf16 (no fp32 upcast): the same model to
    # bf16 rounding (3 significant digits), not to fp32's
    assert results["peftkit:nf4"]["loss"] == pytest.approx(peft["loss"], rel=5e-3)
    assert results["peftkit:nf4"]["param_dtypes"] == ["bfloat16", "float32", "uint8"]
    assert "peftkit nf4 time / peft nf4 time" in data["ratios"]
    assert "peftkit nf4 time / peft nf4 time" in proc.stdout
