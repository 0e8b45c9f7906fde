"""Shared test set-up."""
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs on one intra-op thread: toy models gain nothing from a second one, whose spin-waits made
    files 20x slower on a busy 2-core machine, and a result then does not depend on the machine's core count.
    Subprocesses get OMP_NUM_THREADS=1 too. The thread count is restored afterwards."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture
def write_llama():
    """A function writing a random Llama folder (Hugging Face format, one block unless config says otherwise, weights
    in `dtype`, float32 by default) with a byte-level tokenizer.model: 256 byte ids + Llama 3's 256 specials, so a
    vocabulary of 512 fits it."""
    import base64
    from model import GPT, GPTConfig

    def write(folder, vocab_size: int = 512, dtype=None, **config):
        shape = dict(dim=32, n_layer=1, n_head=2, n_kv_head=1, ffn_hidden=64, max_seq_len=128) | config
        GPT(GPTConfig(vocab_size=vocab_size, **shape)).save_pretrained(folder, dtype)
        (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n"
                                                        for i in range(256)))
        return folder
    return write


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
