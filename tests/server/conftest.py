"""Fixtures of the server tests: one demo-model server for the module, with a models folder that holds a
LoRA for the demo model (so ``<lora:demo_style:0.8>`` has something to name)."""

from __future__ import annotations

import pytest

from tests.server.postgres_helpers import PostgresServer
from tests.server.server_helpers import ServerProcess


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A --models-dir with ``loras/demo_style.safetensors``, a LoRA that fits the demo model."""
    from sd35.demo import load_demo_pipeline
    from sd35.lora import save_lora
    from tests.lora.lora_helpers import lora_models, mixed_lora

    folder = tmp_path_factory.mktemp("models")
    (folder / "loras").mkdir()
    pipe = load_demo_pipeline()
    tensors = mixed_lora(lora_models(pipe), seed=3, scale=0.5)
    attention = {k: v for k, v in tensors.items() if ".attn." in k}  # a LoRA of the attention layers only
    assert attention
    save_lora(folder / "loras" / "demo_style.safetensors", attention)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    """A running ``sd35 serve`` on the demo model (no key), stopped after the module."""
    with ServerProcess(tmp_path_factory.mktemp("serve") / "data", "--models-dir", str(models_dir)) as proc:
        yield proc


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session (see postgres_helpers)."""
    server = PostgresServer().start()
    yield server
    server.stop()
