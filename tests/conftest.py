"""Shared test set-up."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Toy models gain nothing from a second intra-op thread, and on a busy 2-core machine its spin-waits made
    such files 20x slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread
    count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
