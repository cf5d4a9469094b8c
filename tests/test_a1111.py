"""A1111's names for our samplers and schedulers, and the infotext format."""

from __future__ import annotations

import re

from sd35.a1111 import SAMPLER_NAMES, SCHEDULER_NAMES, infotext
from sd35.sampling.samplers import SAMPLERS
from sd35.sampling.schedules import SCHEDULERS

A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's infotext parser


def test_sampler_names():
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert SAMPLER_NAMES["euler_ancestral"] == "Euler a"
    assert SAMPLER_NAMES["dpmpp_2s_ancestral"] == "DPM++ 2S a"
    assert SAMPLER_NAMES["uni_pc"] == "UniPC"
    assert len(set(SAMPLER_NAMES.values())) == len(SAMPLERS)  # the mapping can be read back


def test_scheduler_names():
    assert set(SCHEDULER_NAMES) == set(SCHEDULERS)
    assert SCHEDULER_NAMES["sgm_uniform"] == "SGM Uniform"
    assert SCHEDULER_NAMES["kl_optimal"] == "KL Optimal"
    assert SCHEDULER_NAMES["linear_quadratic"] == "Linear Quadratic"


def test_infotext_quotes_what_a1111_would_and_drops_none():
    text = infotext(
        'a "cat", photo', "blurry", {"Steps": 4, "SLG layers": "7,8,9", "Mask blur": None, "Note": 'a"b'}
    )
    prompt, negative, settings = text.split("\n")
    assert prompt == 'a "cat", photo' and negative == "Negative prompt: blurry"
    pairs = dict(A1111_PAIR.findall(settings))
    assert pairs == {"Steps": "4", "SLG layers": '"7,8,9"', "Note": '"a\\"b"'}
    assert "Negative prompt" not in infotext("x", "", {"Steps": 1})
