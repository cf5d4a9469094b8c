"""``sd35 bench``: the CPU smoke run proves the benchmark runs end to end, that what it times is equivalent to
diffusers, and that bad requests are one clear line with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from sd35 import bench
from sd35.cli import main
from sd35.errors import SD35Error


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _small(*extra: str) -> list[str]:
    """The smallest useful run: scaled config, one size, a few calls."""
    return ["bench", "--device", "cpu", "--scaled", "--sizes", "64", "--iters", "2", "--warmup", "1", *extra]


def test_cpu_step_smoke_writes_json_and_matches_diffusers(capsys, tmp_path):
    out = tmp_path / "res" / "step.json"
    code, stdout, _ = _run(capsys, *_small("--cuda-graphs", "--json", str(out)))
    assert code == 0
    data = json.loads(out.read_text())
    for key in ("date", "device", "versions", "dtype", "config", "equivalence", "steps", "anchors"):
        assert key in data
    assert data["device"]["type"] == "cpu" and data["dtype"] == "fp32"
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["diffusers"]
    assert data["config"]["name"] == "scaled" and data["config"]["mmditx"]["hidden_size"] == 256
    assert data["batch"] == 2 and data["text_tokens"] == 333

    (eq,) = data["equivalence"]
    assert eq["size"] == 64 and eq["ok"] and eq["rel_l2_diff"] < 1e-5 and eq["max_abs_diff"] < 1e-4
    assert eq["ref_max_abs"] > 0.1  # a real output, not zeros

    rows = {(r["engine"], r["variant"]): r for r in data["steps"]}
    for key in (("diffusers", "eager"), ("ours", "eager")):
        r = rows[key]
        assert r["status"] == "ok" and r["size"] == 64 and r["iters"] == 2
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert rows[("ours", "eager")]["rel_l2_diff_vs_diffusers"] < 1e-5
    assert rows[("ours", "cuda_graphs")]["status"] == "unavailable: needs CUDA"
    (paired,) = data["paired"]  # on the CPU both models are also timed in alternating blocks
    assert paired["size"] == 64 and paired["ours_rounds"] == paired["diffusers_rounds"] > 1
    assert 0 < paired["ours_min_ms"] <= paired["ours_median_ms"] <= paired["ours_max_ms"]
    assert paired["diffusers_median_ms"] > 0 and "alternating blocks at 64px" in stdout

    assert "ours ms (p10-p90)" in stdout and "speed-up" in stdout
    assert "cuda_graphs" in stdout and "needs CUDA" in stdout
    assert f"wrote {out}" in stdout


def test_cpu_whole_image_smoke(capsys, tmp_path):
    out = tmp_path / "image.json"
    args = [
        "bench",
        "--device",
        "cpu",
        "--skip-steps",
        "--whole-image",
        "--steps",
        "2",
        "--memory",
        "high,low",
    ]
    code, stdout, _ = _run(capsys, *args, "--json", str(out))
    assert code == 0
    w = json.loads(out.read_text())["whole_image"]
    assert w["config"] == "tiny" and w["steps"] == 2 and w["width"] == 128
    runs = {(r["engine"], r["variant"]): r for r in w["runs"]}
    assert w["memory_modes"] == ["high", "low"]  # one row per mode
    ours = runs[("ours", "memory=high")]
    assert runs[("ours", "memory=low")]["status"] == "ok"
    same, default = runs[("diffusers", "same work")], runs[("diffusers", "default")]
    for r in (ours, same, default):
        assert r["status"] == "ok" and r["seconds"] > 0
    assert ours["t5_tokens"] == same["t5_tokens"] == 77 and default["t5_tokens"] == 256
    assert same["image_max_abs_diff_vs_ours"] <= 2 / 255  # the same image from the same weights and seed
    assert "whole image 128x128" in stdout and "diffusers (same work)" in stdout


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
    code, _, err = _run(capsys, "bench", *device, *args)
    assert code == 2
    assert err.startswith("sd35: error: ") and says in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    code, _, err = _run(capsys, "bench", "--device", "cuda")
    assert code == 2
    assert err.startswith("sd35: error: --device cuda: CUDA is not available")
    assert len(err.strip().splitlines()) == 1


def test_json_path_that_is_a_folder_is_refused(capsys, tmp_path):
    code, _, err = _run(capsys, *_small("--json", str(tmp_path)))
    assert code == 2 and "is a folder" in err


def test_defaults_follow_the_device():
    cpu = bench.make_options(device="cpu")
    assert not cpu.full and cpu.sizes == (128, 256) and cpu.dtype == torch.float32 and cpu.iters == 3
    full = bench.make_options(
        device="cpu", full=True, extra_ours=("compile", "fp8"), extra_diffusers=("compile",)
    )
    assert (
        full.sizes == (512, 1024, 1440)
        and full.config.depth == 24
        and full.config.attn2_layers == tuple(range(13))
    )
    assert full.ours == ("eager", "compile", "fp8") and full.diffusers == ("eager", "compile")
    assert bench.make_options(device="cpu", diffusers="none").diffusers == ()


def test_random_weights_are_seeded_nonzero_and_shared_by_every_build():
    cfg = bench.scaled_config()
    a = bench.build_random(bench.MMDiTX, cfg, torch.device("cpu"), torch.float32, seed=3)
    b = bench.build_random(bench.MMDiTX, cfg, torch.device("cpu"), torch.float32, seed=3)
    c = bench.build_random(bench.MMDiTX, cfg, torch.device("cpu"), torch.float32, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["context_embedder.weight"], sc["context_embedder.weight"])
    for k, v in sa.items():
        assert v.abs().max() > 0, k  # no zero tensor anywhere (adaLN included)
    ada = sa["joint_blocks.0.x_block.adaLN_modulation.1.weight"]
    assert 0.5 < ada.std().item() * cfg.hidden_size**0.5 < 2  # N(0, 1/fan_in)


def test_time_calls_reports_order_statistics_and_the_last_output():
    calls = []

    def fn():
        calls.append(1)
        return torch.full((2,), float(len(calls)))

    stats, out = bench.time_calls(fn, torch.device("cpu"), warmup=2, iters=5)
    assert len(calls) == 7 and out.tolist() == [7.0, 7.0]
    assert stats["iters"] == 5 and stats["warmup"] == 2 and stats["peak_gib"] is None
    assert 0 <= stats["min_ms"] <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["first_call_s"] is not None


def test_fast_paths_compose_and_unavailable_ones_are_reported(monkeypatch):
    model = bench.build_random(
        bench.MMDiTX, bench.scaled_config(), torch.device("cpu"), torch.float32, seed=0
    )
    seen = {}

    def fake_compile(m, dynamic=True):  # like compile_blocks: in place, returns a count
        seen["dynamic"] = dynamic
        return 24

    monkeypatch.setattr(bench, "compile_blocks", fake_compile)
    inp = bench.step_inputs(model.config, 32, torch.device("cpu"), torch.float32, seed=0)
    with torch.inference_mode():
        call = bench.our_runner("compile", model, torch.device("cpu"))(inp)
        assert torch.equal(call(), model(*inp.args))
    assert seen["dynamic"] is False  # one static graph per size
    with pytest.raises(SD35Error, match="compute capability 8.9"):
        bench.our_runner("fp8", model, torch.device("cpu"))
    with pytest.raises(bench.Unavailable, match="needs CUDA"):
        bench.our_runner("compile+cuda_graphs", model, torch.device("cpu"))
    status = bench.acceleration_status(torch.device("cpu"), {"fp8", "cuda_graphs"})
    assert status["fp8"].startswith("unavailable") and status["cuda_graphs"] == "unavailable: needs CUDA"


def test_a_failed_equivalence_check_is_loud_and_exits_1(capsys, tmp_path, monkeypatch):
    # below any difference, even 0: the check must fail on every machine (with 0 it would pass wherever ours
    # and diffusers' kernels happened to round alike)
    monkeypatch.setitem(bench.TOLERANCE, torch.float32, -1.0)
    out = tmp_path / "step.json"
    code, stdout, err = _run(capsys, *_small("--iters", "1", "--warmup", "0", "--json", str(out)))
    assert code == 1
    assert "sd35: warning: at 64px our output differs from diffusers'" in err
    assert "EQUIVALENCE FAILED at 64px" in stdout
    assert json.loads(out.read_text())["equivalence"][0]["ok"] is False
