"""SIGKILL a tiny `peftkit train` run at random moments until it finishes; compare with a run
that was never interrupted. Prints one JSON line with what happened.

Run as a script (one fresh interpreter, so forking is safe: torch has started no threads):
    python kill_worker.py WORKDIR KILLS SEED
It imports peftkit once, then forks one child per attempt; each child runs the CLI entry point
`peftkit.cli.main.main(["train", config, ...])` as `peftkit train` would, with
`train.resume_from=latest`. The parent kills each child after a random delay drawn over the
measured length of a whole run, checks every complete checkpoint left behind, and starts the
next attempt, until a child exits by itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["PEFTKIT_DATA_CACHE"] = os.path.join(sys.argv[1], "data-cache") if len(sys.argv) > 1 else ""

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cli"))

import torch  # noqa: E402

torch.set_num_threads(1)

from cli_helpers import build_chat_tokenizer, causal_config  # noqa: E402
from peftkit.cli.main import main as peftkit_main  # noqa: E402
from peftkit.train.checkpoint_check import check_checkpoint  # noqa: E402
from peftkit.train.checkpoint_folders import list_checkpoints, read_state  # noqa: E402

STEPS = 16


def make_model(root: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = root / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_config(root: Path, model: str, name: str) -> str:
    folder = root / name
    folder.mkdir()
    # Dropout and shuffling make the run depend on every RNG a checkpoint restores.
    path = causal_config(folder, model, fmt="messages", max_steps=STEPS, micro_batch_size=2, save_every=1,
                         keep_last=2, resume_from="latest", lr=5e-3)
    text = Path(path).read_text().replace("target_modules: all-linear",
                                          "target_modules: all-linear\n  lora_dropout: 0.1")
    Path(path).write_text(text)
    return path


def child(config: str) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    code = peftkit_main(["train", config, "--no-eval-before"])
    os._exit(code)


def start(config: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            child(config)
        finally:
            os._exit(99)
    return pid


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(folder: Path) -> dict[int, float]:
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def compare(reference: Path, killed: Path) -> dict:
    """Bytes of the final adapter that differ from the uninterrupted run's, and whether the
    last checkpoint's weights / optimizer state and every logged loss are identical."""
    different = 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        a, b = (reference / name).read_bytes(), (killed / name).read_bytes()
        different += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    last = f"checkpoint-{STEPS}"
    same_checkpoint = all(digest(reference / last / n) == digest(killed / last / n)
                          for n in ("trainable.safetensors", "optimizer.safetensors"))
    return {"adapter_bytes_different": different, "same_last_checkpoint": same_checkpoint,
            "same_losses": losses(reference) == losses(killed),
            "leftovers": sorted(p.name for p in killed.glob("checkpoint-*.*")),
            "lock_left": (killed / ".peftkit-run.lock").exists()}


def timed_reference_run(config: str, out: Path) -> tuple[float, float, float]:
    """Run uninterrupted; return its start-up time (to the first step), time per step (with its
    checkpoint) and whole time, from when each step's metrics record appeared."""
    t0 = time.perf_counter()
    pid = start(config)
    seen: list[float] = []
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        try:
            lines = (out / "metrics.jsonl").read_text().count("\n")
        except FileNotFoundError:
            lines = 0
        seen += [time.perf_counter() - t0] * (lines - len(seen))
        if finished:
            break
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0, "the uninterrupted run failed"
    whole = time.perf_counter() - t0
    step_time = (seen[-1] - seen[0]) / max(len(seen) - 1, 1)
    return seen[0] - step_time, step_time, whole


def warm_up(root: Path) -> None:
    """Import once in the parent what every child would otherwise import again (the recipe
    commands, matplotlib and its font cache), so that kills land in training, not in imports."""
    import peftkit.recipe  # noqa: F401
    from peftkit.train.logging import plot_loss_curve

    plot_loss_curve([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], root / "warm_up.png")


def main() -> None:
    root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    warm_up(root)
    model = make_model(root)
    reference_config, killed_config = run_config(root, model, "reference"), run_config(root, model, "killed")
    reference_out, killed_out = root / "reference" / "run", root / "killed" / "run"

    startup, step_time, whole = timed_reference_run(reference_config, reference_out)

    landed = {"during a checkpoint write": 0, "outside checkpoint writes": 0}
    bad_checkpoints, episodes, attempts, exit_code = [], [], 0, None
    while True:
        attempts += 1
        left_before = set(killed_out.glob("checkpoint-*.*"))
        pid = start(killed_config)
        done = sum(landed.values())
        finished, status = 0, 0
        if done < kills:
            if done % 2:  # inside a checkpoint write: soon after its temporary folder appears
                deadline = time.perf_counter() + startup + 6 * step_time
                while not finished and time.perf_counter() < deadline:
                    if set(killed_out.glob("checkpoint-*.tmp-*")) - left_before:
                        time.sleep(rng.uniform(0.0, 0.03))
                        break
                    time.sleep(0.002)
                    finished, status = os.waitpid(pid, os.WNOHANG)
            else:  # anywhere from the child's start-up to a few steps into training
                time.sleep(rng.uniform(0.5 * startup, startup + 4 * step_time))
            if not finished:
                finished, status = os.waitpid(pid, os.WNOHANG)
            if finished == 0:
                os.kill(pid, signal.SIGKILL)
                wait(pid)
                writing = bool(set(killed_out.glob("checkpoint-*.*")) - left_before)  # its own .tmp-/.old- folder
                landed["during a checkpoint write" if writing else "outside checkpoint writes"] += 1
                for _, folder in list_checkpoints(killed_out):
                    try:
                        check_checkpoint(folder, read_state(folder))
                    except Exception as exc:  # noqa: BLE001 - reported, then asserted by the test
                        bad_checkpoints.append(f"{folder.name}: {exc}")
                continue
        exit_code = os.waitstatus_to_exitcode(status) if finished else wait(pid)
        if exit_code != 0:
            break
        episodes.append(compare(reference_out, killed_out))  # a run finished: it must equal the reference
        if sum(landed.values()) >= kills:
            break
        shutil.rmtree(killed_out)  # start the next run from scratch
    print(json.dumps({
        "kills": sum(landed.values()), "landed": landed, "attempts": attempts, "final_exit_code": exit_code,
        "completed_runs": episodes, "bad_checkpoints": bad_checkpoints,
        "uninterrupted_run_s": round(whole, 2), "startup_s": round(startup, 2), "step_s": round(step_time, 3),
    }))


if __name__ == "__main__":
    main()
