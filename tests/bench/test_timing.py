"""sd35.bench.timing: order statistics of the timed calls, and the output that was timed."""

from __future__ import annotations

import torch

from sd35.bench.timing import percentile, time_calls, time_paired


def test_time_calls_reports_order_statistics_and_the_last_output():
    calls = []

    def fn():
        calls.append(1)
        return torch.full((2,), float(len(calls)))

    stats, out = time_calls(fn, torch.device("cpu"), warmup=2, iters=5)
    assert len(calls) == 7 and out.tolist() == [7.0, 7.0]
    assert stats["iters"] == 5 and stats["warmup"] == 2 and stats["peak_gib"] is None
    assert 0 <= stats["min_ms"] <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["first_call_s"] is not None


def test_percentile_interpolates_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 5.0], 0.0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 5.0], 1.0) == 5.0
    assert percentile([1.0, 2.0, 3.0, 5.0], 0.5) == 2.5


def test_time_paired_runs_every_callable_in_every_round():
    counts = {"a": 0, "b": 0}

    def call(name):
        def fn():
            counts[name] += 1
            return torch.zeros(())

        return fn

    result = time_paired({"a": call("a"), "b": call("b")}, rounds=3, block=2)
    assert counts == {"a": 9, "b": 9}  # per round: one untimed call and a block of 2
    for r in result.values():
        assert r["rounds"] == 3 and r["block"] == 2 and 0 <= r["min_ms"] <= r["median_ms"] <= r["max_ms"]
