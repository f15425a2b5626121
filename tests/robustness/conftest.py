"""The robustness suite (issue 15): every hostile or broken input of the data-and-files side,
driven through the public API or the `peftkit` command, with its exact outcome asserted."""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Shared helpers of the training-loop and CLI tests (tiny models, a tiny tokenizer, configs).
for folder in (HERE, HERE.parent / "train", HERE.parent / "cli"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from one_thread import one_torch_thread  # noqa: E402,F401  (autouse)
