from __future__ import annotations

import pytest

from sd35.testing import torch_threads
from tests.lora.lora_helpers import make_models


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def models():
    return make_models()
