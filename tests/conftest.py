"""Fixtures shared by the test modules: the micro tokenizer, and one torch thread for tiny-model tests."""
import pytest
import torch

from thinkrl.models.micro import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is ~100x faster than two on a busy 2-core machine (no oversubscription).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
