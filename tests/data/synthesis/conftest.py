import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Synthesis runs one thread per DataLoader worker; tests do the same.

    The ops here are many and small: with 2 intra-op threads on a shared 2-core
    machine each op waits for a free core, and the suite runs ~7x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
