"""sd35.bench.report: the JSON is saved as rows arrive, and the tables are made from it alone."""

from __future__ import annotations

import json

from sd35.bench.options import make_options
from sd35.bench.report import Report, tables_from_json


def test_tables_come_back_from_a_saved_json(tmp_path):
    path = tmp_path / "bench.json"
    report = Report(make_options(device="cpu", sizes="64", json_path=path))
    report.add("equivalence", {"size": 64, "ok": True, "rel_l2_diff": 1e-7})
    timed = {"median_ms": 10.0, "p10_ms": 9.0, "p90_ms": 12.0, "status": "ok"}
    report.add("steps", {"size": 64, "engine": "diffusers", "variant": "eager", **timed})
    report.add("steps", {"size": 64, "engine": "ours", "variant": "eager", **timed, "median_ms": 5.0})
    report.add("steps", {"size": 64, "engine": "ours", "variant": "fp8", "status": "unavailable: needs CUDA"})
    assert len(json.loads(path.read_text())["steps"]) == 3  # saved after every row
    table = tables_from_json(path)
    assert "5.0 (9.0-12.0)" in table and "2.00x" in table  # speed-up = diffusers eager / ours
    assert "ours fp8 at 64px: unavailable: needs CUDA" in table
    assert "EQUIVALENCE FAILED" not in table


def test_an_empty_json_says_so(tmp_path):
    path = tmp_path / "bench.json"
    Report(make_options(device="cpu", json_path=path)).save()
    assert tables_from_json(path) == f"{path}: no results"
