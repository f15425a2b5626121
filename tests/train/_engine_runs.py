"""Shared by the FSDP2 and DeepSpeed tests: their runs (several per torchrun launch), the
worker loop each engine's worker script calls, and the comparison with one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

from _tiny_train import lm_rows, max_diff, tiny_llama, trainable
from safetensors.torch import load_file, save_file

from peftkit.train import NonFiniteLossError, TrainConfig, list_checkpoints, train
from peftkit.train.logging import read_metrics

# Two processes x micro batch 2 against one process x micro batch 4: the same global batch.
COMMON = dict(max_steps=4, grad_accum=2, seed=3, lr=1e-2, save_every=2, eval_every=4, log_every=1, progress=False)


def standard_runs(root: Path, **common) -> list[dict]:
    """Plain (no dropout), straight with dropout 0.1, and the latter resumed from its step-2
    checkpoint into another folder; `common` overrides COMMON."""
    base = dict(COMMON, **common, micro_batch_size=2)
    return [
        {"dropout": 0.0, "config": dict(base, output_dir=str(root / "plain"))},
        {"dropout": 0.1, "config": dict(base, output_dir=str(root / "straight"))},
        {"dropout": 0.1, "config": dict(base, output_dir=str(root / "resumed"),
                                        resume_from=str(root / "straight" / "checkpoint-2"))},
    ]


def launch(worker: Path, runs: list[dict], timeout: int = 600) -> None:
    """Run `worker` under `torchrun --nproc_per_node 2` with one JSON argument per run.

    A failed launch is retried once, with a warning carrying its stderr: one launch in about
    eight full-suite runs failed once on the shared 2-vCPU machine and never again in isolation
    (its output was not kept). A real failure fails both times and raises with both outputs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           *[json.dumps(run) for run in runs]]
    errors = []
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return
        errors.append(proc.stderr[-6000:])
        for run in runs:  # a clean start: no half-written checkpoints for the retry to resume from
            shutil.rmtree(run["config"]["output_dir"], ignore_errors=True)
        warnings.warn(f"torchrun launch of {worker.name} failed (exit {proc.returncode}), retrying once:\n{errors[-1]}")
    raise AssertionError("torchrun failed twice:\n" + "\n----- second launch -----\n".join(errors))


def run_all(argv: list[str], after_train: Callable | None = None) -> None:
    """The worker side: train the tiny Llama once per JSON run. A run with "nan_after_step": k
    turns the activations NaN from step k + 1 and records where the loop stopped."""
    for raw in argv:
        run = json.loads(raw)
        model = tiny_llama(dropout=run["dropout"])
        poisoned, on_step_end = [], None
        if run.get("nan_after_step"):
            model.get_base_model().model.norm.register_forward_hook(
                lambda module, args, output: output * float("nan") if poisoned else output)

            def on_step_end(info, after=run["nan_after_step"]):
                if info.step == after:
                    poisoned.append(True)
        try:
            train(model, lm_rows(13, seed=11), lm_rows(5, seed=12), TrainConfig(**run["config"]),
                  on_step_end=on_step_end)
        except NonFiniteLossError as err:
            out = Path(run["config"]["output_dir"])
            if os.environ["RANK"] == "0":
                (out / "stopped.json").write_text(json.dumps({"step": err.step, "message": str(err)}))
                save_file(trainable(model), str(out / "weights_after_stop.safetensors"))
            continue
        if after_train is not None:
            after_train(model)


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_matches_one_process(run_dir: Path, tmp_path: Path, **common) -> list[dict]:
    """Train one process with the same global batch and check `run_dir` against it: final
    adapter, eval loss, every step's loss / lr / gradient norm, and the checkpoint files
    (whole tensors, the single-process layout). Returns the single-process step records."""
    single_dir = tmp_path / "single"
    result = train(tiny_llama(), lm_rows(13, seed=11), lm_rows(5, seed=12),
                   TrainConfig(**dict(COMMON, **common), output_dir=str(single_dir), micro_batch_size=4))
    assert max_diff(adapter(run_dir), adapter(single_dir)) < 1e-5
    assert max_diff(adapter(run_dir), tiny_llama().adapter_state_dict()) > 1e-3  # it did train
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert abs(summary["final_eval"]["eval_loss"] - result.eval_metrics["eval_loss"]) < 1e-5
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    single_steps = [r for r in read_metrics(single_dir / "metrics.jsonl") if "loss" in r]
    assert len(steps) == len(single_steps) == 4
    for a, b in zip(steps, single_steps):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"]
        assert abs(a["lr"] - b["lr"]) < 1e-12

    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        ours, single = (load_file(str(folder / "checkpoint-2" / name)) for folder in (run_dir, single_dir))
        assert ours.keys() == single.keys()
        assert max_diff(ours, single) < 1e-5
    names = [json.loads((folder / "checkpoint-2" / "optimizer.json").read_text())["param_names"]
             for folder in (run_dir, single_dir)]
    assert names[0] == names[1]
    return single_steps


def assert_resume_is_exact(root: Path) -> None:
    # Dropout 0.1: equal only if weights, the re-sharded / re-partitioned Adam moments and
    # every rank's RNG came back.
    assert max_diff(adapter(root / "resumed"), adapter(root / "straight")) < 1e-6
    assert max_diff(adapter(root / "resumed"), adapter(root / "plain")) > 1e-4  # dropout did change the run
    assert json.loads((root / "resumed" / "summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
