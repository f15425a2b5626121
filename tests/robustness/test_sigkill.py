"""SIGKILL a tiny `peftkit train` run 20 times at random moments, half of them inside a
checkpoint write; every run that finishes must equal the uninterrupted one bit for bit."""
import json
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "kill_worker.py"
KILLS = 20


def test_twenty_sigkills_leave_a_bit_exact_adapter(tmp_path):
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), str(KILLS), "15"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["kills"] == KILLS
    assert report["landed"]["during a checkpoint write"] >= 5  # every other kill waits for a write
    assert report["final_exit_code"] == 0
    assert report["bad_checkpoints"] == []  # every complete checkpoint seen after a kill loads
    assert report["completed_runs"], "no run finished"
    for run in report["completed_runs"]:
        assert run == {"adapter_bytes_different": 0, "same_last_checkpoint": True, "same_losses": True,
                       "leftovers": [], "lock_left": False}
