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


@pytest.fixture(scope="module")
def small_world():
    """The world's tokenizer, the seed-0 world, and a 2-block random model over its vocabulary."""
    from model import GPT, GPTConfig
    from oracle import World
    from start import world_tokenizer
    tokenizer, world = world_tokenizer(), World(seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", n_layer=2, vocab_size=tokenizer.n_vocab)).eval()
    return tokenizer, world, model
