import sys
from pathlib import Path

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path;
# the shared tiny-model helpers (also used by the DDP worker script) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))

from one_thread import one_torch_thread  # noqa: E402,F401  (autouse)
