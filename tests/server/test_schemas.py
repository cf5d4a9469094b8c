"""The wire formats as pure conversions (no model, no HTTP): the native job body is GenerateRequest as JSON
both ways, A1111's and OpenAI's bodies map onto it, and an infotext reads back as it was written."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image, ImageOps
from pydantic import ValidationError

from sd35.a1111 import infotext, parse_infotext, request_infotext
from sd35.control.unit import ControlUnit
from sd35.demo import DEMO_DEFAULTS
from sd35.errors import InvalidRequest
from sd35.request import Edit, GenerateRequest, HiresFix, LoraRef, TextOptions
from sd35.sampling.guidance import APG, SkipLayerGuidance
from sd35.server.schemas.a1111 import Img2ImgBody, Txt2ImgBody, model_name
from sd35.server.schemas.native import JobCreate
from sd35.server.schemas.openai import ImagesEditForm, ImagesGenerateBody, parse_size


def _image(size=(48, 32), seed=0) -> Image.Image:
    """An RGB image whose pixels differ (a gradient), so a swapped or re-encoded image is noticed."""
    w, h = size
    im = Image.new("RGB", size)
    im.putdata(
        [((x * 5 + seed) % 256, (y * 7) % 256, (x * y + seed) % 256) for y in range(h) for x in range(w)]
    )
    return im


def _mask(size=(48, 32)) -> Image.Image:
    w, h = size
    m = Image.new("L", size, 0)
    m.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return m


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- native


FULL = dict(
    prompt='a red circle, on: a "blue" square',
    negative_prompt="blurry",
    width=64,
    height=48,
    steps=3,
    cfg=2.5,
    sampler="dpmpp_2m",
    scheduler="karras",
    shift=2.0,
    seed=5,
    num_images=2,
    slg=SkipLayerGuidance(layers=(1, 2), scale=2.0, start=0.1, end=0.5),
    apg=APG(eta=0.5, norm_threshold=2.0, momentum=-0.5),
    loras=(LoraRef("demo_style", 0.8), LoraRef("other", -0.25)),
    text=TextOptions(t5_max_tokens=100, weighting="comfy", long_clip=True),
)

REQUESTS = {
    "minimal": GenerateRequest(prompt="a cat"),
    "every part, inpainting": GenerateRequest(
        **FULL, edit=Edit(image=_image(), strength=0.6, mask=_mask(), mask_blur=3.0)
    ),
    "img2img with hires": GenerateRequest(
        prompt="a cat",
        edit=Edit(image=_image(seed=9), strength=0.4),
        hires=HiresFix(scale=1.5, steps=2, strength=0.3, upscaler="lanczos"),
    ),
    "outpainting": GenerateRequest(prompt="a cat", edit=Edit(image=_image(), outpaint=(16, 0, 16, 8))),
    "hires, slg left to the model": GenerateRequest(prompt="x", hires=HiresFix(), slg=SkipLayerGuidance()),
    "zeros are not unset": GenerateRequest(prompt="", cfg=0.0, seed=0, apg=APG()),
    "two ControlNets": GenerateRequest(
        prompt="a cat",
        controls=(
            ControlUnit(
                model="canny", image=_image(seed=3), strength=0.7, start=0.1, end=0.9, preprocess="canny"
            ),
            ControlUnit(
                model="depth", image=_image(seed=4), resize_mode="resize_and_fill", low_threshold=50.0
            ),
        ),
    ),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_native_body_round_trips_a_request(name):
    req = REQUESTS[name]
    body = JobCreate.from_request(req)
    assert body.to_request() == req
    # as the job store keeps it: JSON text, read back
    stored = json.loads(json.dumps(body.model_dump(exclude_none=True)))
    again = JobCreate.model_validate(stored).to_request()
    assert again == req
    if req.edit is not None:
        assert again.edit.image.tobytes() == req.edit.image.tobytes()
        assert again.edit.image.mode == "RGB"
        if req.edit.mask is not None:
            assert again.edit.mask.mode == "L"
            assert again.edit.mask.tobytes() == req.edit.mask.tobytes()


def test_native_body_names_the_model_apart_from_the_request():
    body = JobCreate.from_request(REQUESTS["minimal"], model="other_model")
    assert body.model == "other_model"
    assert body.to_request() == REQUESTS["minimal"]


@pytest.mark.parametrize(
    "body, where",
    [
        ({"prompt": "x", "stepz": 3}, "stepz"),
        ({"prompt": "x", "slg": {"layer": [1]}}, "layer"),
        ({"prompt": "x", "hires": {"scale": 2, "denoise": 0.5}}, "denoise"),
        ({"prompt": "x", "loras": [{"name": "a", "weight": 1}]}, "weight"),
        ({"prompt": "x", "edit": {"image": "AAAA", "strenght": 0.5}}, "strenght"),
    ],
)
def test_native_body_refuses_unknown_fields(body, where):
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(body)
    assert where in str(info.value)
    assert any(e["type"] == "extra_forbidden" for e in info.value.errors())


def test_native_fields_left_out_stay_unset_and_take_the_models_defaults():
    req = JobCreate.model_validate(
        {"prompt": "x", "width": None, "slg": {}, "hires": {"scale": 1.5}}
    ).to_request()
    assert req == GenerateRequest(prompt="x", slg=SkipLayerGuidance(), hires=HiresFix(scale=1.5))
    for name in ("width", "height", "steps", "cfg", "sampler", "scheduler", "shift", "seed"):
        assert getattr(req, name) is None, name
    assert req.slg.layers is None and req.hires.steps is None
    resolved = req.resolved(DEMO_DEFAULTS)
    assert (resolved.width, resolved.height, resolved.steps) == (64, 64, 20)
    assert (resolved.cfg, resolved.sampler, resolved.shift) == (DEMO_DEFAULTS.cfg, "euler", 1.0)
    assert resolved.slg == DEMO_DEFAULTS.slg
    assert resolved.hires.steps == 20
    # and the JSON of an unset request carries no value for them
    dumped = JobCreate.from_request(req).model_dump(exclude_none=True)
    assert set(dumped) == {
        "prompt",
        "negative_prompt",
        "num_images",
        "noise",
        "batch_noise",
        "slg",
        "hires",
        "loras",
        "controls",
        "text",
    }
    assert dumped["slg"] == {"window": "steps"}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "width": 65}, "width"),
        ({"prompt": "x", "sampler": "euler_a"}, "sampler"),
        ({"prompt": "x", "slg": {"layers": []}}, "slg.layers"),
        ({"prompt": "x", "edit": {"image": "not base64!"}}, "edit.image"),
        ({"prompt": "x", "edit": {"image": base64.b64encode(b"hello").decode()}}, "edit.image"),
        ({"prompt": "x", "hires": {"upscaler": "esrgan"}}, "hires.upscaler"),
        ({"prompt": "x", "text": {"weighting": "heavy"}}, "text.weighting"),
    ],
)
def test_native_values_are_checked_by_the_request(body, param):
    with pytest.raises(InvalidRequest) as info:
        JobCreate.model_validate(body).to_request()
    assert info.value.param == param


# ---------------------------------------------------------------------------------------------- A1111


@pytest.mark.parametrize(
    "fields, sampler, scheduler",
    [
        ({"sampler_name": "Euler a"}, "euler_ancestral", None),
        ({"sampler_name": "DPM++ 2M Karras"}, "dpmpp_2m", "karras"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "dpmpp_2m", "karras"),
        ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Automatic"}, "dpmpp_2m", "karras"),
        ({"sampler_name": "DPM++ 2M Karras", "scheduler": "SGM Uniform"}, "dpmpp_2m", "sgm_uniform"),
        ({"sampler_name": "euler", "scheduler": "beta"}, "euler", "beta"),
        ({"sampler_index": "UniPC"}, "uni_pc", None),
        ({"scheduler": "Linear Quadratic"}, None, "linear_quadratic"),
        ({}, None, None),
    ],
)
def test_a1111_sampler_and_schedule_names(fields, sampler, scheduler):
    req = Txt2ImgBody(prompt="x", **fields).to_request()
    assert (req.sampler, req.scheduler) == (sampler, scheduler)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"sampler_name": "Euler b"}, "sampler_name"),
        ({"sampler_name": "DPM++ 2M Fancy"}, "sampler_name"),
        ({"scheduler": "Cosine"}, "scheduler"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_iter": 0}, "n_iter"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"prompt": "a <lora:demo_style:strong>"}, "prompt"),
        ({"steps": 0}, "steps"),
    ],
)
def test_a1111_bad_fields_name_their_param(fields, param):
    with pytest.raises(InvalidRequest) as info:
        Txt2ImgBody(**{"prompt": "x", **fields}).to_request()
    assert info.value.param == param


def test_a1111_txt2img_maps_its_fields():
    body = Txt2ImgBody(
        prompt="a cat <lora:demo_style:0.8> on a mat <lora:other>",
        negative_prompt="dog",
        seed=7,
        batch_size=2,
        n_iter=3,
        steps=4,
        cfg_scale=3.5,
        width=64,
        height=48,
        restore_faces=True,  # an A1111 field sd35 has no use for: accepted, ignored
        alwayson_scripts={},
    )
    assert body.to_request() == GenerateRequest(
        prompt="a cat on a mat",
        negative_prompt="dog",
        seed=7,
        num_images=6,
        steps=4,
        cfg=3.5,
        width=64,
        height=48,
        loras=(LoraRef("demo_style", 0.8), LoraRef("other", 1.0)),
    )
    assert Txt2ImgBody(prompt="x").to_request().seed == -1  # A1111's random, drawn by the engine


def test_a1111_hires_fields():
    def hires(**fields):
        return Txt2ImgBody(prompt="x", enable_hr=True, **fields).to_request().hires

    assert hires() == HiresFix(scale=2.0, upscaler="latent")
    assert hires(hr_scale=1.5, hr_upscaler="Lanczos") == HiresFix(scale=1.5, upscaler="lanczos")
    assert hires(hr_upscaler="Latent (bicubic antialiased)").upscaler == "latent"
    assert hires(width=64, height=48, hr_resize_x=96) == HiresFix(scale=1.5)
    assert hires(width=64, height=48, hr_resize_x=96, hr_resize_y=96).scale == 2.0  # the larger factor
    assert hires(width=64, height=48, hr_resize_y=72).scale == 1.5
    full = hires(hr_second_pass_steps=3, denoising_strength=0.35, hr_upscaler="Latent")
    assert full == HiresFix(scale=2.0, steps=3, strength=0.35, upscaler="latent")
    # hires fields without enable_hr do nothing
    assert Txt2ImgBody(prompt="x", hr_scale=3.0, hr_upscaler="nonsense").to_request().hires is None


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
        ({"hr_resize_x": 128}, "hr_resize_x"),  # no width/height to scale from
        ({"hr_scale": 8.0}, "hires.scale"),
        ({"denoising_strength": 0.0}, "hires.strength"),
    ],
)
def test_a1111_bad_hires_fields(fields, param):
    with pytest.raises(InvalidRequest) as info:
        Txt2ImgBody(prompt="x", enable_hr=True, **fields).to_request()
    assert info.value.param == param


def test_a1111_img2img_maps_images_and_mask():
    image, mask = _image(), _mask()
    body = Img2ImgBody(
        prompt="a cat",
        init_images=["data:image/png;base64," + _b64(image), _b64(_image(seed=3))],
        mask=_b64(mask),
        mask_blur=4,
        denoising_strength=0.55,
    )
    req = body.to_request()
    assert req.edit == Edit(image=image, mask=mask, mask_blur=4.0, strength=0.55)
    inverted = Img2ImgBody(init_images=[_b64(image)], mask=_b64(mask), inpainting_mask_invert=1).to_request()
    assert inverted.edit.mask.tobytes() == ImageOps.invert(mask).tobytes()
    plain = Img2ImgBody(init_images=[_b64(image, "JPEG")]).to_request()
    assert plain.edit.mask is None and plain.edit.strength is None and plain.edit.image.size == image.size


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["%%%"]}, "init_images"),
        ({"init_images": [base64.b64encode(b"plain text").decode()]}, "init_images"),
        ({"init_images": [_b64(_image())], "mask": "AAA"}, "mask"),
        ({"init_images": [_b64(_image())], "denoising_strength": 1.5}, "edit.strength"),
    ],
)
def test_a1111_bad_img2img(fields, param):
    with pytest.raises(InvalidRequest) as info:
        Img2ImgBody(prompt="x", **fields).to_request()
    assert info.value.param == param


def test_a1111_img2img_needs_init_images():
    with pytest.raises(ValidationError):
        Img2ImgBody(prompt="x")


@pytest.mark.parametrize(
    "title, name",
    [
        ("sd35_demo [abc123]", "sd35_demo"),
        ("sd3.5_medium.safetensors [0123456789]", "sd3.5_medium"),
        ("  my model  ", "my model"),
        ("name [not a hash]", "name [not a hash]"),
    ],
)
def test_a1111_checkpoint_titles(title, name):
    assert model_name(title) == name
    body = Txt2ImgBody(
        prompt="x", override_settings={"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 2}
    )
    assert body.model() == name


def test_a1111_override_settings_without_a_model():
    assert Txt2ImgBody(prompt="x").model() is None
    assert Txt2ImgBody(prompt="x", override_settings={"eta_noise_seed_delta": 31337}).model() is None
    with pytest.raises(InvalidRequest) as info:
        Txt2ImgBody(prompt="x", override_settings={"sd_model_checkpoint": 3}).model()
    assert info.value.param == "model"


# ---------------------------------------------------------------------------------------------- infotext


@pytest.mark.parametrize(
    "prompt, negative, settings",
    [
        ("a cat", "", {"Steps": 4, "Sampler": "Euler", "CFG scale": 4.0, "Seed": 1, "Size": "64x64"}),
        (
            "a cat, sitting\non two lines",
            "blurry, ugly\nand more",
            {"Steps": 20, "LoRA": "a:0.8, b:1", "Model": 'my "model": v2', "Note": "back\\slash, comma"},
        ),
        ("a: colon", "no", {"Outpaint": "16,0,16,8", "Version": "sd35 1.0", "Empty": None, "Time": "12:30"}),
        ("", "", {"Steps": 4, "Seed": 1, "Size": "64x64"}),  # A1111's default prompt is empty
        ("", "only a negative", {"Steps": 4}),
        ("  spaced prompt ", "", {"Steps": 4}),
    ],
)
def test_parse_infotext_inverts_infotext(prompt, negative, settings):
    text = infotext(prompt, negative, settings)
    assert parse_infotext(text) == (
        prompt,
        negative,
        {k: str(v) for k, v in settings.items() if v is not None},
    )


def test_parse_infotext_reads_a_full_request_infotext():
    req = GenerateRequest(
        **{**FULL, "negative_prompt": "blurry, dark"},
        hires=HiresFix(scale=1.5, steps=2, strength=0.3, upscaler="lanczos"),
    ).resolved(DEMO_DEFAULTS)
    text = request_infotext(req, 5, (64, 48), "sd35_demo", {"demo_style": 0.8, "other": -0.25})
    prompt, negative, settings = parse_infotext(text)
    assert (prompt, negative) == (req.prompt, req.negative_prompt)
    assert settings["Steps"] == "3"
    assert settings["Sampler"] == "DPM++ 2M"
    assert settings["Schedule type"] == "Karras"
    assert settings["CFG scale"] == "2.5"
    assert settings["Seed"] == "5"
    assert settings["Size"] == "64x48"
    assert settings["Model"] == "sd35_demo"
    assert settings["Shift"] == "2.0"
    assert settings["Hires upscale"] == "1.5" and settings["Hires upscaler"] == "Lanczos"
    assert settings["SLG layers"] == "1,2"
    assert settings["APG momentum"] == "-0.5"
    assert settings["Prompt weighting"] == "comfy"
    assert settings["T5 max tokens"] == "100"
    assert settings["LoRA"] == "demo_style:0.8, other:-0.25"
    assert settings["Version"].startswith("sd35 ")


# ---------------------------------------------------------------------------------------------- OpenAI


@pytest.mark.parametrize(
    "size, parsed",
    [
        ("1024x1024", (1024, 1024)),
        ("512X768", (512, 768)),
        (" 64 x 48 ", (64, 48)),
        ("auto", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_size(size, parsed):
    assert parse_size(size) == parsed


@pytest.mark.parametrize(
    "size", ["big", "1024", "1024x", "x1024", "-64x64", "64x64x64", "64.5x64", "", "1234567x1"]
)
def test_parse_size_refuses(size):
    with pytest.raises(InvalidRequest) as info:
        parse_size(size)
    assert info.value.param == "size"


@pytest.mark.parametrize("n, ok", [(0, False), (-1, False), (11, False), (1, True), (10, True)])
def test_openai_n_range(n, ok):
    body = ImagesGenerateBody(prompt="x", n=n)
    if ok:
        assert body.to_request().num_images == n
    else:
        with pytest.raises(InvalidRequest) as info:
            body.to_request()
        assert info.value.param == "n"


def test_openai_generate_maps_fields_and_ignores_extras():
    body = ImagesGenerateBody.model_validate(
        {
            "prompt": "a cat",
            "size": "64x48",
            "n": 2,
            "seed": 3,
            "negative_prompt": "dog",
            "quality": "hd",
            "style": "vivid",
            "user": "someone",
            "background": "transparent",
            "moderation": "low",
            "model": "sd35_demo",
        }
    )
    assert body.to_request() == GenerateRequest(
        prompt="a cat", negative_prompt="dog", width=64, height=48, num_images=2, seed=3
    )
    assert ImagesGenerateBody(prompt="a cat").to_request() == GenerateRequest(prompt="a cat")
    with pytest.raises(InvalidRequest) as info:
        ImagesGenerateBody(prompt="a cat", size="0x64").to_request()
    assert info.value.param == "width"


def test_openai_edit_form_maps_image_and_mask():
    image, mask = _image(), _mask()
    req = ImagesEditForm(prompt="a cat", size="auto", n=3).to_request(image, mask)
    assert req == GenerateRequest(prompt="a cat", num_images=3, edit=Edit(image=image, mask=mask))
    assert ImagesEditForm(prompt="a cat").to_request(image, None).edit == Edit(image=image)


def test_the_native_body_carries_every_request_field():
    """A field added to GenerateRequest must reach the wire too (JobCreate is written by hand)."""
    from dataclasses import fields

    from sd35.request import GenerateRequest
    from sd35.server.schemas.native import JobCreate

    assert {f.name for f in fields(GenerateRequest)} <= set(JobCreate.model_fields)
