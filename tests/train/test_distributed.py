"""Multi-process training on the CPU (gloo): ``torchrun --nproc_per_node 2`` equals one process at the same
global batch size, for LoRA under DDP and for full fine-tuning under FSDP (whose checkpoints resume exactly)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file

from sd35.cli.train import main_train
from tests.helpers import subprocess_env

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("one_thread_per_module"),
]


@pytest.fixture(scope="module")
def common(tiny, tmp_path_factory):
    """Flags shared by every run: the tiny model, 8 captioned images, one cache."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(8):
        a = np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8)
        a[8:40, 16:48] = rng.integers(0, 256, 3)
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}", encoding="utf-8")
    cache = tmp_path_factory.mktemp("cache")
    return [
        "--model", str(tiny["diffusers"]), "--data-dir", str(folder), "--cache-dir", str(cache),
        "--resolution", "64", "--device", "cpu", "--mixed-precision", "no", "--save-dtype", "fp32",
        "--shuffle", "false", "--seed", "3",
    ]  # fmt: skip


def _torchrun(args: list[str], nproc: int = 2) -> None:
    env = subprocess_env(OMP_NUM_THREADS="1")  # the workers import the sd35 this test imported
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # the timeout guards against a hang, it is no speed limit: a loaded 2-core machine takes minutes
    done = subprocess.run([*cmd, "-m", "sd35.cli.train", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def test_ddp_lora_two_processes_equal_one(common, tmp_path):
    """1 process x batch 4 == 2 processes x batch 2 (gradient accumulation 2 exercises DDP's no_sync)."""
    lora = ["--mode", "lora", "--lora-rank", "4", "--learning-rate", "1e-2", "--max-steps", "6",
            "--gradient-accumulation", "2", "--caption-dropout", "0.25", "--pos-embed-crop",
            "--validation-prompts", "a square", "--validation-steps", "2", "--validation-slg-layers", "1"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main_train([*common, *lora, "--batch-size", "4", "--output-dir", str(one)]) == 0
    _torchrun([*common, *lora, "--batch-size", "2", "--output-dir", str(two)])
    for name in ("sd35_lora.safetensors", "sd35_lora_diffusers.safetensors"):
        diff = _max_diff(one / name, two / name)
        assert diff < 1e-4, (name, diff)  # the reduction order differs; AdamW turns that into ~1e-5
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    assert len(_losses(two)) == 6  # rank 0 alone logs and saves
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step00000006-00.png"]


def test_fsdp_full_two_processes_equal_one_and_resume_exactly(common, tmp_path):
    full = ["--mode", "full", "--learning-rate", "1e-3", "--max-steps", "4", "--save-every", "2"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    assert main_train([*common, *full, "--batch-size", "4", "--output-dir", str(one)]) == 0
    _torchrun([*common, *full, "--fsdp", "--batch-size", "2", "--output-dir", str(two)])
    assert _max_diff(one / "sd35_full.safetensors", two / "sd35_full.safetensors") < 1e-4
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    # the FSDP checkpoint (gathered to full tensors) resumes the sharded run exactly
    state = torch.load(two / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["sampler"]) == 2
    shutil.copytree(two / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    _torchrun(
        [*common, *full, "--fsdp", "--batch-size", "2", "--output-dir", str(resumed), "--resume", "latest"]
    )
    assert _max_diff(two / "sd35_full.safetensors", resumed / "sd35_full.safetensors") == 0.0
    assert _losses(resumed) == _losses(two)[2:]
