import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny models run fastest on one thread, and on a loaded 2-core machine the OpenMP thread
    # pool's barriers make each small matmul ~1000x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
