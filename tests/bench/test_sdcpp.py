"""stable-diffusion.cpp as a benchmark peer (sd35/bench/sdcpp.py, ``sd35 bench --peers``), without sd.cpp: its
log is read from a captured excerpt, a stand-in sd-cli prints such a log, and the comparison runs ours
against diffusers when it is absent."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from sd35.bench.peers import table
from sd35.bench.sdcpp import comparison_config, find_sdcpp, parse_sdcpp_log, run_sdcpp, sdcpp_command
from sd35.errors import SD35Error
from sd35.models.configs import medium_mmditx_config
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
# sd-cli's own output (stable-diffusion-cpp-python 0.4.7's sd.cpp, depth-8 random weights, 256 px, 4 Euler
# steps, CFG 4.5, -t 2, a loaded machine) from "running in FLOW mode" to the saved image, bytes unchanged:
# the progress bar rewrites one line with \r and ESC[K, its numbers are the running average per step.
LOG = REPO / "tests" / "fixtures" / "sdcpp" / "sd-cli-256px-4-steps.log"


def test_captured_log_gives_the_steady_step_without_the_first():
    timing = parse_sdcpp_log(LOG.read_text(errors="replace"))
    assert timing.steps == 4
    # averages 15.43 (step 1) and 12.82 (step 4): steps 2-4 took 4 * 12.82 - 15.43 seconds
    assert timing.first_step_s == pytest.approx(15.43)
    assert timing.step_s == pytest.approx((4 * 12.82 - 15.43) / 3, abs=1e-9)
    assert timing.sampling_s == pytest.approx(51.27)
    assert timing.mean_step_s == pytest.approx(51.27 / 4)


def test_it_per_s_and_a_progress_bar_after_sampling():
    log = (
        "  |==>   | 1/3 - 2.00it/s\x1b[K\r  |====> | 2/3 - 2.50it/s\x1b[K\r  |======| 3/3 - 4.00it/s\x1b[K\n"
        "[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 0.75s\n"
        "  |======| 9/9 - 30.00s/it\x1b[K\n"  # a tiled VAE decode: not a sampling step
    )
    timing = parse_sdcpp_log(log)
    assert (timing.steps, timing.first_step_s) == (3, 0.5)
    assert timing.step_s == pytest.approx((3 / 4.0 - 0.5) / 2)


def test_a_failed_run_is_one_clear_error():
    log = "[ERROR] model.cpp:1035 - tensor 'model.diffusion_model.context_embedder.bias' has wrong shape\n"
    with pytest.raises(SD35Error, match="no complete sampling progress"):
        parse_sdcpp_log(log)


def test_depth_24_is_sd35_medium_and_smaller_depths_keep_its_shape():
    assert comparison_config(24) == medium_mmditx_config()
    cfg = comparison_config(8)
    assert (cfg.hidden_size, cfg.num_heads, cfg.context_dim, cfg.pooled_dim) == (512, 8, 4096, 2048)
    assert cfg.attn2_layers == (0, 1, 2, 3) and cfg.pos_embed_max_size == 384


def test_command_asks_for_cfg_steps_at_the_size_type_and_threads(tmp_path):
    files = {n: tmp_path / f"{n}.safetensors" for n in ("model", "clip_l", "clip_g")}
    cmd = sdcpp_command(
        tmp_path / "sd-cli", files, size=384, steps=3, wtype="q8_0", threads=2, output=tmp_path / "o.png"
    )
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert pairs["-W"] == pairs["-H"] == "384" and pairs["--type"] == "q8_0" and pairs["-t"] == "2"
    assert float(pairs["--cfg-scale"]) > 1 and pairs["--steps"] == "3"


def test_finding_sd_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCPP_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_sdcpp() is None
    with pytest.raises(SD35Error, match="build_sdcpp.sh"):
        find_sdcpp(tmp_path / "nowhere" / "sd-cli")
    binary = tmp_path / "build" / "bin" / "sd-cli"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert find_sdcpp() == binary


def _fake_sd_cli(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake-sd-cli"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return [str(script)]


def test_run_stops_sd_cli_once_sampling_is_logged(tmp_path):
    # prints the captured log (its decode lines after "sampling completed" included), then would idle for 60 s
    command = _fake_sd_cli(tmp_path, f"cat '{LOG}'\nsleep 60")
    t0 = time.perf_counter()
    timing, wall, log = run_sdcpp(command)
    assert time.perf_counter() - t0 < 30 and wall < 30  # stopped, not waited for
    assert timing.steps == 4 and timing.sampling_s == pytest.approx(51.27)
    assert "sampling completed" in log


def test_a_failing_sd_cli_is_one_error_with_its_log(tmp_path):
    command = _fake_sd_cli(tmp_path, 'echo "[ERROR] load tensors from file failed"\nexit 1')
    with pytest.raises(SD35Error, match="(?s)no complete sampling progress.*load tensors from file failed"):
        run_sdcpp(command)


def _peers(capsys, tmp_path, *more: str) -> tuple[dict, str, str]:
    out = tmp_path / "cpu.json"
    argv = ["bench", "--device", "cpu", "--peers", "--depth", "2", "--sizes", "64", "--rounds", "1"]
    code, stdout, stderr = run_cli(capsys, *argv, "--iters", "1", "--json", str(out), *more)
    assert code == 0, stderr
    return json.loads(out.read_text()), stdout, stderr


def test_peers_without_sdcpp_time_ours_against_diffusers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDCPP_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    report, stdout, stderr = _peers(capsys, tmp_path)
    assert "sd.cpp was not found" in stderr
    assert report["sdcpp_found"] is False and report["sdcpp_runs"] == []
    assert all(row["ok"] for row in report["equivalence"]) and len(report["equivalence"]) == 2
    engines = {row["engine"]: row["step_s"] for row in report["rows"]}
    assert set(engines) == {"ours bf16", "diffusers bf16", "ours fp32", "diffusers fp32"}
    assert all(seconds > 0 for seconds in engines.values())
    assert set(report["matmul_flops_per_s"]) == {"bf16", "fp32"}
    assert "| 64 px |" in stdout and "sd.cpp" not in stdout.split("load average")[0]
    assert "ours bf16 / diffusers bf16" in stdout and "of the bf16 matmul rate" in stdout


def test_peers_with_an_sd_cli_rank_ours_against_its_fastest_type(tmp_path, monkeypatch, capsys):
    """A stand-in sd-cli logs a 2-step run whose steady step is 0.75 s for q8_0 and 1.5 s for f16 (its
    ``--type`` read from the command line); the weight files it would read are already in the weights
    folder, so none are written."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("sd3.5m-depth2-seed0-f32", "clip_l", "clip_g"):
        (weights / f"{name}.safetensors").write_bytes(b"")
    binary = _fake_sd_cli(
        tmp_path,
        'case "$*" in *q8_0*) a=1.00; b=0.875 ;; *) a=2.00; b=1.75 ;; esac\n'
        'echo "1/2 - ${a}s/it"; echo "2/2 - ${b}s/it"; echo "sampling completed, taking 3.00s"',
    )[0]
    report, stdout, _ = _peers(
        capsys, tmp_path, "--sdcpp", binary, "--sdcpp-types", "f16,q8_0", "--sdcpp-weights", str(weights),
        "--peer-dtypes", "bf16", "--sdcpp-threads", "1", "--plot", str(tmp_path / "plot.png"),
    )  # fmt: skip
    steps = {row["engine"]: row["step_s"] for row in report["rows"]}
    assert steps["sd.cpp q8_0"] == pytest.approx(0.75) and steps["sd.cpp f16"] == pytest.approx(1.5)
    assert report["sdcpp_threads"] == 1 and {r["type"] for r in report["sdcpp_runs"]} == {"f16", "q8_0"}
    line = next(ln for ln in stdout.splitlines() if ln.startswith("| 64 px |"))
    assert f"{steps['ours bf16'] / 0.75:.2f}x" in line
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_peer_options_are_one_error(tmp_path, capsys):
    for argv, says in (
        (["--sizes", "100"], "multiples of 64"),
        (["--peer-dtypes", "fp16"], "--peer-dtypes"),
        (["--device", "cuda"], "use --device cpu"),
        (["--sdcpp", str(tmp_path / "none")], "build_sdcpp.sh"),
    ):
        code, _, err = run_cli(capsys, "bench", "--peers", *argv)
        assert code != 0 and says in err and "Traceback" not in err


def test_table_gives_the_ratios_and_the_matmul_share():
    rows = [
        {"engine": "ours bf16", "size": 256, "step_s": 1.0, "flops": 1e12},
        {"engine": "diffusers bf16", "size": 256, "step_s": 1.25, "flops": 1e12},
        {"engine": "diffusers fp32", "size": 256, "step_s": 4.0, "flops": 1e12},
        {"engine": "sd.cpp f16", "size": 256, "step_s": 4.0, "flops": 1e12},
        {"engine": "sd.cpp q8_0", "size": 256, "step_s": 2.0, "flops": 1e12},
    ]
    text = table(rows, [256], "bf16", {"bf16": 2e12})
    assert "| 256 px | 1.000 | 1.250 | 4.000 | 4.000 | 2.000 | 0.25x | 0.80x | 0.50x | 50% |" in text
