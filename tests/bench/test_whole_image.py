"""sd35.bench.whole_image: both pipelines make the same image from one random folder, one row per memory mode."""

from __future__ import annotations

import json

from tests.helpers import run_cli


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
    code, stdout, _ = run_cli(capsys, *args, "--json", str(out))
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
