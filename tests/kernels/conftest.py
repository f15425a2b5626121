import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: OpenMP hand-offs cost more than they save, and thrash on a loaded machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
