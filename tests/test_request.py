"""The request object: one table of bad requests, each refused with its kind, its field and a useful message;
and how a request is resolved against a model's defaults."""

from __future__ import annotations

import dataclasses
import random

import pytest
from PIL import Image

from sd35.demo import DEMO_DEFAULTS
from sd35.errors import InvalidRequest, SD35Error
from sd35.presets import SD35_MEDIUM, from_metadata, to_metadata
from sd35.request import MAX_SEED, Edit, GenerateRequest, HiresFix, LoraRef, TextOptions
from sd35.sampling.guidance import APG, SkipLayerGuidance

IMAGE = Image.new("RGB", (100, 60), (10, 20, 30))


def _edit(**kw):
    return Edit(image=IMAGE, **kw)


BAD = [
    # (what, request fields (made inside the test: sub-settings check themselves), error param, message)
    ("width 0 is not 'unset'", lambda: dict(width=0), "width", "positive multiple of 16"),
    ("unknown noise mode", lambda: dict(noise="a1111"), "noise", "choose one of: sd35, comfyui"),
    ("unknown batch noise", lambda: dict(batch_noise="rows"), "batch_noise", "per_image, batch"),
    (
        "unknown SLG window",
        lambda: dict(slg=SkipLayerGuidance(window="time")),
        "slg.window",
        "'steps' or 'sigma'",
    ),
    ("a ComfyUI sampler we lack", lambda: dict(sampler="dpm_fast"), "sampler", "unknown sampler 'dpm_fast'"),
    ("width not a multiple of 16", lambda: dict(width=50), "width", "use 48 or 64"),
    ("height just above a multiple", lambda: dict(height=1000), "height", "use 992 or 1008"),
    ("tiny width", lambda: dict(width=8), "width", "use 16"),
    ("float width", lambda: dict(width=64.0), "width", "use 64"),
    ("bool width", lambda: dict(width=True), "width", "positive multiple of 16"),
    ("zero steps", lambda: dict(steps=0), "steps", "positive integer"),
    ("fractional steps", lambda: dict(steps=2.5), "steps", "positive integer"),
    ("negative cfg", lambda: dict(cfg=-1.0), "cfg", "finite number >= 0"),
    ("nan cfg", lambda: dict(cfg=float("nan")), "cfg", "finite number >= 0"),
    ("zero shift", lambda: dict(shift=0.0), "shift", "positive number"),
    ("unknown sampler", lambda: dict(sampler="dpm_fast"), "sampler", "dpmpp_2m"),
    ("unknown scheduler", lambda: dict(scheduler="ddim"), "scheduler", "karras"),
    ("zero images", lambda: dict(num_images=0), "num_images", "positive integer"),
    ("seed overflow", lambda: dict(seed=MAX_SEED + 1), "seed", "from 0 to"),
    ("negative seed other than -1", lambda: dict(seed=-2), "seed", "-1 for random"),
    ("seed run past the end", lambda: dict(seed=MAX_SEED, num_images=2), "seed", "runs past"),
    ("prompt not text", lambda: dict(prompt=None), "prompt", "must be text"),
    ("slg layers empty", lambda: dict(slg=SkipLayerGuidance(layers=())), "slg.layers", "at least one layer"),
    (
        "slg window reversed",
        lambda: dict(slg=SkipLayerGuidance(start=0.5, end=0.1)),
        "slg.start",
        "start < end",
    ),
    ("slg scale negative", lambda: dict(slg=SkipLayerGuidance(scale=-1.0)), "slg.scale", ">= 0"),
    ("apg momentum", lambda: dict(apg=APG(momentum=2.0)), "apg.momentum", "[-1, 1]"),
    ("strength above 1", lambda: dict(edit=_edit(strength=1.5)), "edit.strength", "between 0 and 1"),
    ("mask without image", lambda: dict(edit=Edit(image=None, mask=IMAGE)), "edit.image", "init image"),
    ("negative mask blur", lambda: dict(edit=_edit(mask_blur=-1.0)), "edit.mask_blur", "from 0 to"),
    ("huge mask blur", lambda: dict(edit=_edit(mask_blur=1e20)), "edit.mask_blur", "from 0 to 1024"),
    ("unknown edit mode", lambda: dict(edit=_edit(mode="a1111")), "edit.mode", "sd35, comfyui"),
    (
        "outpaint with mask",
        lambda: dict(edit=_edit(outpaint=(8, 0, 0, 0), mask=IMAGE)),
        "edit.mask",
        "its own mask",
    ),
    (
        "outpaint canvas too large",  # np.pad would need 10**20 pixel columns
        lambda: dict(edit=_edit(outpaint=(0, 0, 10**20, 0))),
        "edit.outpaint",
        "smaller borders",
    ),
    ("outpaint all zero", lambda: dict(edit=_edit(outpaint=(0, 0, 0, 0))), "edit.outpaint", "not all 0"),
    (
        "outpaint three numbers",
        lambda: dict(edit=_edit(outpaint=(8, 8, 8))),
        "edit.outpaint",
        "four border sizes",
    ),
    (
        "hires and inpainting",
        lambda: dict(hires=HiresFix(), edit=_edit(mask=IMAGE)),
        "hires",
        "cannot be combined",
    ),
    ("hires scale", lambda: dict(hires=HiresFix(scale=5.0)), "hires.scale", "at most 4"),
    ("hires strength", lambda: dict(hires=HiresFix(strength=0.0)), "hires.strength", "from 0.01 to 1"),
    # a tiny strength would stretch the hires schedule to steps / strength sigmas (1e-9: billions)
    ("tiny hires strength", lambda: dict(hires=HiresFix(strength=1e-9)), "hires.strength", "from 0.01 to 1"),
    (
        "hires upscaler",
        lambda: dict(hires=HiresFix(upscaler="esrgan")),
        "hires.upscaler",
        "latent or lanczos",
    ),
    ("t5 tokens", lambda: dict(text=TextOptions(t5_max_tokens=0)), "text.t5_max_tokens", "positive integer"),
    ("weighting", lambda: dict(text=TextOptions(weighting="strong")), "text.weighting", "comfy"),
    ("lora strength", lambda: dict(loras=(LoraRef("a", float("inf")),)), "loras", "finite number"),
    ("lora twice", lambda: dict(loras=(LoraRef("a"), LoraRef("a", 0.5))), "loras", "named twice"),
    ("lora as text", lambda: dict(loras=("style.safetensors",)), "loras", "LoraRef"),
    ("slg as a bool", lambda: dict(slg=True), "slg", "SkipLayerGuidance"),
]


@pytest.mark.parametrize("what,fields,param,says", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_refused_naming_the_field(what, fields, param, says):
    with pytest.raises(InvalidRequest) as caught:
        GenerateRequest(**{"prompt": "a cat"} | fields())
    assert caught.value.param == param
    assert says in str(caught.value)


def test_errors_keep_their_field_when_pickled():
    import pickle

    e = pickle.loads(pickle.dumps(InvalidRequest("bad width", param="width")))
    assert (
        isinstance(e, InvalidRequest)
        and isinstance(e, SD35Error)
        and e.param == "width"
        and str(e) == "bad width"
    )


def test_a_request_is_frozen():
    req = GenerateRequest(prompt="a cat")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.steps = 3


DEMO_LIKE = dataclasses.replace(DEMO_DEFAULTS, name="small", height=48)  # a non-square default size


def test_resolution_fills_every_unset_field_from_the_model():
    req = GenerateRequest(prompt="a cat", slg=SkipLayerGuidance(scale=3.0), hires=HiresFix())
    done = req.resolved(DEMO_LIKE, rng=random.Random(0))
    assert (done.width, done.height, done.steps, done.cfg) == (64, 48, 20, 4.0)
    assert (done.sampler, done.scheduler, done.shift) == ("euler", "normal", 1.0)
    assert done.slg == SkipLayerGuidance(layers=(2,), scale=3.0, start=0.01, end=0.3)  # the given scale stays
    assert done.hires.steps == 20  # the first pass's
    assert 0 <= done.seed < 2**32 and done.is_resolved and not req.is_resolved
    assert done.resolved(SD35_MEDIUM) == done  # resolving twice changes nothing


def test_given_values_win_and_zero_is_not_unset():
    req = GenerateRequest(prompt="a", width=32, steps=3, cfg=0.0, shift=2.0, seed=0, sampler="heun")
    done = req.resolved(DEMO_LIKE)
    assert (done.width, done.height, done.steps, done.cfg, done.shift, done.seed) == (32, 48, 3, 0.0, 2.0, 0)
    assert done.sampler == "heun"


def test_random_seed_is_drawn_once():
    a = GenerateRequest(prompt="a", seed=-1).resolved(DEMO_LIKE, rng=random.Random(1))
    b = GenerateRequest(prompt="a", seed=-1).resolved(DEMO_LIKE, rng=random.Random(2))
    assert a.seed != b.seed and a.seed != -1
    assert a.seeds == [a.seed] and GenerateRequest(prompt="a", seed=5, num_images=3).seeds == [5, 6, 7]


def test_edit_size_and_strength_defaults():
    done = GenerateRequest(prompt="a", edit=_edit()).resolved(DEMO_LIKE)
    assert (done.width, done.height) == (96, 48)  # the init image's 100x60, rounded down to multiples of 16
    assert done.edit.strength == 0.8
    inpaint = GenerateRequest(prompt="a", edit=_edit(mask=IMAGE)).resolved(DEMO_LIKE)
    assert inpaint.edit.strength == 1.0
    out = GenerateRequest(prompt="a", edit=_edit(outpaint=(12, 0, 20, 4))).resolved(DEMO_LIKE)
    assert (out.width, out.height) == (128, 64) and out.edit.strength == 1.0  # the canvas 132x64
    fixed = GenerateRequest(prompt="a", width=32, edit=_edit()).resolved(DEMO_LIKE)
    assert (fixed.width, fixed.height) == (32, 48)


def test_metadata_written_before_comfyui_names_reads_simple_as_normal():
    """Files written when "simple" named the reference's schedule (the demo model's) keep their image."""
    old = (
        to_metadata(DEMO_DEFAULTS)
        .replace('"schedule_names": "comfyui", ', "")
        .replace('"normal"', '"simple"')
    )
    assert "schedule_names" not in old and '"simple"' in old
    assert from_metadata(old).scheduler == "normal"
    new = to_metadata(dataclasses.replace(DEMO_DEFAULTS, scheduler="simple"))
    assert from_metadata(new).scheduler == "simple"  # a marked file's "simple" is ComfyUI's


def test_presets_round_trip_through_file_metadata():
    assert from_metadata(to_metadata(DEMO_LIKE)) == DEMO_LIKE
    with pytest.raises(SD35Error, match="malformed"):
        from_metadata('{"width": 64}')
    with pytest.raises(SD35Error, match="unknown sampler"):
        from_metadata(to_metadata(dataclasses.replace(DEMO_LIKE, sampler="nope")))
