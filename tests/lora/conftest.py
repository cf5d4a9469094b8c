from __future__ import annotations

import pytest
import torch
from lora_helpers import make_models


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models gain nothing from threads, and busy-waiting threads slow them badly on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def models():
    return make_models()
