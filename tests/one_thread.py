"""An autouse fixture for tests of tiny models: torch runs them on one intra-op thread.

Tiny tensors gain nothing from threads, and on a busy 2-core machine spinning OpenMP workers
make each small op many times slower. A conftest (or test module) that wants it imports it:
`from one_thread import one_torch_thread  # noqa: F401`.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
