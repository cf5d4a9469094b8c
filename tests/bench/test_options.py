"""sd35.bench.options: bad requests are one clear line with exit code 2, and defaults follow the device."""

from __future__ import annotations

import pytest
import torch

from sd35.bench.options import make_options
from tests.bench.bench_helpers import small
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "args,says",
    [
        (["--sizes", "500"], "size 500 is not a positive multiple of 16"),
        (["--sizes", "big"], "--sizes takes comma-separated pixel sizes"),
        (["--scaled", "--sizes", "1440"], "larger than the scaled config"),
        (["--ours", "turbo"], "unknown variant 'turbo'"),
        (["--ours", "cuda_graphs+compile"], "cuda_graphs must come last"),
        (["--diffusers", "fp8"], "unknown variant 'fp8'"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--skip-steps"], "leaves nothing to run"),
        (["--whole-image", "--image-size", "1024"], "larger than the tiny pipeline allows"),
        (["--device", "tpu"], "is not a device name"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, args, says):
    device = [] if "--device" in args else ["--device", "cpu"]
    code, _, err = run_cli(capsys, "bench", *device, *args)
    assert code == 2
    assert err.startswith("sd35: error: ") and says in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "bench", "--device", "cuda")
    assert code == 2
    assert err.startswith("sd35: error: --device: device 'cuda': this machine's torch")
    assert len(err.strip().splitlines()) == 1


def test_json_path_that_is_a_folder_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, *small("--json", str(tmp_path)))
    assert code == 2 and "is a folder" in err


def test_defaults_follow_the_device():
    cpu = make_options(device="cpu")
    assert not cpu.full and cpu.sizes == (128, 256) and cpu.dtype == torch.float32 and cpu.iters == 3
    full = make_options(device="cpu", full=True, extra_ours=("compile", "fp8"), extra_diffusers=("compile",))
    assert (
        full.sizes == (512, 1024, 1440)
        and full.config.depth == 24
        and full.config.attn2_layers == tuple(range(13))
    )
    assert full.ours == ("eager", "compile", "fp8") and full.diffusers == ("eager", "compile")
    assert make_options(device="cpu", diffusers="none").diffusers == ()
