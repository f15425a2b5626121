import sys
from pathlib import Path

import pytest
import torch

# The suite runs with --import-mode=importlib, which does not put test folders on sys.path;
# the shared tiny-model helpers (also used by the DDP worker script) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # The models here are tiny: thread hand-offs cost more than they save, and on a busy
    # 2-core machine spinning OpenMP workers multiply the CPU time several times over.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
