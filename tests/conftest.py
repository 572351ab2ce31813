import warnings

import pytest
import torch
from hypothesis import settings

settings.register_profile("privgrad", max_examples=12, deadline=None, derandomize=True)
settings.load_profile("privgrad")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _book_keeping(monkeypatch):
    """Test-sized layers would all be materialised (``B × params <= DENSE_ELEMENTS``); the
    tests want the book-keeping path (ghost norms, one-matmul clipped sums) in ``auto`` and
    ``ghost`` mode, so the threshold is 0 unless a test sets it (tests/test_layers.py)."""
    from privgrad.per_sample import ghost

    monkeypatch.setattr(ghost, "DENSE_ELEMENTS", 0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
