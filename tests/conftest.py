import warnings

import pytest
import torch
from hypothesis import settings

settings.register_profile("privgrad", max_examples=12, deadline=None, derandomize=True)
settings.load_profile("privgrad")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
