import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run a test on one torch thread: tiny tensors gain nothing from a second thread, and on a shared,
    busy 2-core machine the OpenMP barriers made such tests 10-40x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
