"""sd35.bench.steps: the CPU smoke run proves the step benchmark runs end to end, that what it times is
equivalent to diffusers, that fast paths are applied in the one order and unavailable ones reported."""

from __future__ import annotations

import json

import pytest
import torch

import sd35.accel.apply
from sd35.bench import steps
from sd35.bench.random_models import step_inputs
from sd35.models.configs import scaled_mmditx_config
from sd35.models.mmditx import MMDiTX
from sd35.models.random_init import build_random
from tests.bench.bench_helpers import small
from tests.helpers import run_cli


def test_cpu_step_smoke_writes_json_and_matches_diffusers(capsys, tmp_path):
    out = tmp_path / "res" / "step.json"
    code, stdout, _ = run_cli(capsys, *small("--cuda-graphs", "--json", str(out)))
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


def test_fast_paths_compose_and_unavailable_ones_are_reported(monkeypatch):
    model = build_random(MMDiTX, scaled_mmditx_config(), torch.device("cpu"), torch.float32, seed=0)
    seen = {}

    def fake_compile(m, dynamic=True):  # like compile_blocks: in place, returns a count
        seen["dynamic"] = dynamic
        return 24

    monkeypatch.setattr(sd35.accel.apply, "compile_blocks", fake_compile)
    inp = step_inputs(model.config, 32, torch.device("cpu"), torch.float32, seed=0)
    with torch.inference_mode():
        call = steps.our_runner("compile", model, torch.device("cpu"))(inp)
        assert torch.equal(call(), model(*inp.args))
    assert seen["dynamic"] is False  # one static graph per size
    for variant in ("fp8", "compile+cuda_graphs"):  # GPU-only: refused by sd35.accel's check before any work
        with pytest.raises(steps.Unavailable, match="needs CUDA"):
            steps.our_runner(variant, model, torch.device("cpu"))
    status = steps.acceleration_status(torch.device("cpu"), {"fp8", "cuda_graphs"})
    assert status["fp8"].startswith("unavailable") and status["cuda_graphs"] == "unavailable: needs CUDA"


def test_a_failed_equivalence_check_is_loud_and_exits_1(capsys, tmp_path, monkeypatch):
    # below any difference, even 0: the check must fail on every machine (with 0 it would pass wherever ours
    # and diffusers' kernels happened to round alike)
    monkeypatch.setitem(steps.TOLERANCE, torch.float32, -1.0)
    out = tmp_path / "step.json"
    code, stdout, err = run_cli(capsys, *small("--iters", "1", "--warmup", "0", "--json", str(out)))
    assert code == 1
    assert "sd35: warning: at 64px our output differs from diffusers'" in err
    assert "EQUIVALENCE FAILED at 64px" in stdout
    assert json.loads(out.read_text())["equivalence"][0]["ok"] is False
