"""What a run reports: metrics.jsonl, a progress bar, TensorBoard, loss_curve.png, summary.json.

The one writer of those files (a caller adds its own records through `train`'s eval_before and
summary_extra). Only the main process writes; on the others every method is a no-op.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_CURVE_FILE = "loss_curve.png"


def require_tensorboard() -> Any:
    """`torch.utils.tensorboard.SummaryWriter`, or a clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError(
            "tensorboard=True needs the `tensorboard` package, which is not installed "
            "(pip install tensorboard), or set tensorboard: false; metrics.jsonl is always written"
        ) from err
    return SummaryWriter


class RunLogger:
    """Writes one JSON object per log/eval step to `metrics.jsonl` and mirrors it to the bar / TensorBoard.

    `resume_step`: when resuming, records after that step (written by the run that was
    interrupted after its last checkpoint) are dropped so the file reads as one run.
    `eval_before`: metrics of an eval before training, the step-0 record (replacing an earlier
    session's), so the loss curve starts before the first step.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        is_main: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        tensorboard: bool,
        resume_step: int | None,
        eval_before: dict[str, Any] | None = None,
    ):
        self.dir = Path(output_dir)
        self.is_main = is_main
        self.bar = None
        self.tb = None
        self._echo = False
        if tensorboard:
            writer_cls = require_tensorboard()  # on every process, so all fail alike
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / METRICS_FILE
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= resume_step] if resume_step else []
        if eval_before:
            kept = [r for r in kept if not (r.get("step") == 0 and "eval_loss" in r)]
            kept.insert(0, _json_safe({"step": 0, "epoch": 0.0, **eval_before}))
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            self.tb = writer_cls(log_dir=str(self.dir / "tensorboard"))
        if progress:
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            else:  # batch jobs still see one line per log step
                self._echo = True

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        """Append a record (must have `step`); train records update the bar, all go to TensorBoard."""
        if not self.is_main:
            return
        record = _json_safe(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(_tb_tag(key), value, record["step"])
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "eval_loss", "lr", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=False)
        elif self._echo:
            print(" ".join(f"{k}={_short(v)}" for k, v in record.items()), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the bar and TensorBoard, write `summary.json` and `loss_curve.png`."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        atomic_write_text(str(self.dir / SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True) + "\n")
        plot_loss_curve(read_metrics(self.metrics_path), self.dir / LOSS_CURVE_FILE)

    def close(self) -> None:
        """Release the bar and TensorBoard without writing a summary (a run that failed)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (none when there is no file yet).

    A line that is not a JSON object is skipped with a warning naming the file, the line and
    what is wrong: the file is a report, not training state (that is in the checkpoints), so
    a damaged line must not stop a resume or the loss curve, but must not vanish unnoticed.
    A cut-off last line is what a killed run leaves.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # nothing was lost
        try:
            record = json.loads(line)
        except ValueError as exc:
            cut = number == len(lines) and not text.endswith("\n")
            why = "cut off (the run was killed while writing it)" if cut else f"not JSON ({exc})"
            warnings.warn(f"{path} line {number} is {why}; skipped", stacklevel=2)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"{path} line {number} is {type(record).__name__} {line[:40]!r}, not a record; skipped",
                          stacklevel=2)
            continue
        records.append(record)
    return records


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path) -> None:
    """Train loss per log step and eval loss per eval, against the optimizer step."""
    # The object API with an explicit Agg canvas leaves the global pyplot backend untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target)")
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    else:
        ax.set_title("no loss was logged (run shorter than log_every and no eval)")
    fig.tight_layout()
    fig.savefig(str(path))


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/Infinity (an fp16 overflow step has an infinite gradient norm).
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _short(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else round(value, 4)
    return value


def _tb_tag(key: str) -> str:
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def perplexity(loss: float) -> float | None:
    """exp(loss); None where it overflows (JSON has no infinity)."""
    return math.exp(loss) if loss < 700 else None
