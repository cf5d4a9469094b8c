"""The SD3 family beside SD3.5 Medium: SD3.5 Large, SD3.5 Large Turbo and SD3 Medium load through the same code.

Tiny random networks built like each release (Large: qk-norm, no attn2; SD3 Medium: neither), written in the
official single-file layout and the diffusers layout, compute what diffusers' ``SD3Transformer2DModel``
computes on the same weights; each gets the reference's defaults for its release (Stability-AI/sd3.5
``sd3_infer.py`` ``CONFIGS``, REFERENCE.md 2.6), named by the file's metadata or name since a toy network has no
release's size; a Large Turbo file is a Large one that says so; an explicit variant wins; and a Large-like
model runs end to end like diffusers' ``StableDiffusion3Pipeline``.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from sd35 import GenerateRequest, load_pipeline
from sd35.errors import InvalidRequest
from sd35.loading.components import load_models
from sd35.loading.writers import write_diffusers, write_official, write_text_encoders
from sd35.models.configs import tiny_configs
from sd35.testing import tiny_weights
from tests.helpers import rel_err, run_cli
from tests.test_pipeline import PROMPT, assert_image_matches_diffusers

# REFERENCE.md 2.6 (sd3_infer.py CONFIGS): (steps, cfg, sampler, shift) per release
REFERENCE_DEFAULTS = {
    "medium": (50, 5.0, "dpmpp_2m", 3.0),
    "large": (40, 4.5, "dpmpp_2m", 3.0),
    "large-turbo": (4, 1.0, "euler", 3.0),
    "sd3-medium": (50, 5.0, "dpmpp_2m", 1.0),
}
STRUCTURE = {  # how each release is built (attn2 blocks, qk-norm), at the tiny size
    "medium": dict(attn2_layers=(0, 1), qk_norm=True),
    "large": dict(attn2_layers=(), qk_norm=True),
    "large-turbo": dict(attn2_layers=(), qk_norm=True),
    "sd3-medium": dict(attn2_layers=(), qk_norm=False),
}
# how each tiny file says which release it is: Stability's modelspec metadata, or the reference's file names
FILES = {
    "medium": ("sd3.5_medium.safetensors", None),
    "large": ("model.safetensors", {"modelspec.architecture": "stable-diffusion-v3.5-large"}),
    "large-turbo": (
        "model.safetensors",
        {
            "modelspec.architecture": "stable-diffusion-v3.5-large",
            "modelspec.title": "Stable Diffusion 3.5 Large Turbo",
        },
    ),
    "sd3-medium": ("sd3_medium.safetensors", None),
}
TITLES = {
    "medium": "SD3.5 Medium",
    "large": "SD3.5 Large",
    "large-turbo": "SD3.5 Large Turbo",
    "sd3-medium": "SD3 Medium",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """variant -> (weights, official single file, diffusers folder named after the release)."""
    out = {}
    for i, (variant, structure) in enumerate(STRUCTURE.items()):
        w = tiny_weights(seed=50 + i, configs=tiny_configs(**structure))
        folder = tmp_path_factory.mktemp(variant)
        name, metadata = FILES[variant]
        official = write_official(folder / name, w, metadata=metadata)
        diffusers = write_diffusers(folder / f"stable-diffusion-3.5-{variant}", w)
        if variant == "sd3-medium":
            diffusers = diffusers.rename(folder / "stable-diffusion-3-medium")
        write_text_encoders(folder / "text_encoders", w)
        out[variant] = (w, official, diffusers)
    return out


def _load(family, release, layout="official", **kw):
    _, official, diffusers = family[release]
    if layout == "diffusers":
        return load_pipeline(diffusers, device="cpu", **kw)
    return load_pipeline(
        official, official.parent / "text_encoders", tokenizers=diffusers, device="cpu", **kw
    )


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("variant", list(STRUCTURE))
def test_each_release_gets_the_references_defaults(family, variant, layout):
    pipe = _load(family, variant, layout)
    assert pipe.identity.variant == variant and pipe.identity.title == TITLES[variant]
    steps, cfg, sampler, shift = REFERENCE_DEFAULTS[variant]
    d = pipe.defaults
    assert (d.steps, d.cfg, d.sampler, d.shift) == (steps, cfg, sampler, shift)
    bare = pipe.check(GenerateRequest(prompt=PROMPT, width=32, height=32)).request
    assert (bare.steps, bare.cfg, bare.sampler, bare.shift) == (steps, cfg, sampler, shift)
    # explicit values win over the release's
    given = GenerateRequest(prompt=PROMPT, width=32, height=32, steps=7, cfg=2.5, sampler="heun", shift=2.0)
    req = pipe.check(given).request
    assert (req.steps, req.cfg, req.sampler, req.shift) == (7, 2.5, "heun", 2.0)


def test_large_turbo_generates_with_its_defaults(family):
    pipe = _load(family, "large-turbo")
    result = pipe.run(GenerateRequest(prompt=PROMPT, width=32, height=32, seed=1))
    params = result.infotexts[0]
    assert "Steps: 4," in params and "Sampler: Euler," in params and "CFG scale: 1.0," in params
    assert "Shift: 3.0" in params


def test_a_renamed_turbo_file_needs_the_variant_option(family, tmp_path):
    w, _, _ = family["large-turbo"]
    renamed = write_official(tmp_path / "my_model.safetensors", w)
    tokenizers = family["large-turbo"][2]
    encoders = family["large-turbo"][1].parent / "text_encoders"
    plain = load_pipeline(renamed, encoders, tokenizers=tokenizers, device="cpu")
    assert plain.identity.variant is None and plain.defaults.name == "custom"  # a toy size names no release
    told = load_pipeline(renamed, encoders, tokenizers=tokenizers, device="cpu", variant="large-turbo")
    assert told.identity.title == "SD3.5 Large Turbo" and told.defaults.steps == 4
    # the option also wins over what the file says of itself
    large = _load(family, "large-turbo", variant="large")
    assert large.identity.variant == "large" and large.defaults.steps == 40


@pytest.mark.parametrize(
    "variant,says",
    [
        ("medium", "not built like SD3.5 Medium"),
        ("sd3-medium", "not built like SD3 Medium"),
        ("xl", "unknown"),
    ],
)
def test_a_variant_the_weights_contradict_is_refused(family, variant, says):
    with pytest.raises(InvalidRequest, match=says) as e:
        _load(family, "large", variant=variant)
    assert e.value.param == "variant"


def test_cli_variant_flag(family, capsys, tmp_path):
    _, official, diffusers = family["large"]
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(official), "--text-encoders", str(official.parent / "text_encoders")]
    args += [
        "--tokenizers",
        str(diffusers),
        "--device",
        "cpu",
        "--prompt",
        PROMPT,
        "--width",
        "32",
        "--height",
        "32",
    ]
    code, _, err = run_cli(capsys, *args, "--variant", "large-turbo", "--seed", "3", "-o", str(out))
    assert code == 0, err
    from PIL import Image

    with Image.open(out) as im:
        assert "Steps: 4," in im.info["parameters"] and "Sampler: Euler," in im.info["parameters"]
    code, _, err = run_cli(capsys, *args, "--variant", "xl")
    assert code == 2 and "--variant" in err


@pytest.mark.parametrize("variant", ["large", "sd3-medium"])
def test_both_layouts_compute_what_diffusers_computes(family, variant):
    from diffusers import SD3Transformer2DModel

    w, official, diffusers = family[variant]
    ref = SD3Transformer2DModel.from_pretrained(diffusers / "transformer").eval()
    cfg = w.configs.mmditx
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 12, generator=g)
    t = torch.tensor([991.0, 13.5])
    y = torch.randn(2, cfg.pooled_dim, generator=g)
    ctx = torch.randn(2, 11, cfg.context_dim, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        for path in (official, diffusers):
            ours = load_models([path], kinds=["mmditx"])["mmditx"]
            assert ours.config == cfg
            assert rel_err(ours(x, t, y, ctx), expected) <= 1e-5


@pytest.fixture(scope="module")
def large_pair(family):
    from diffusers import StableDiffusion3Pipeline

    root = family["large"][2]
    return load_pipeline(root, device="cpu"), StableDiffusion3Pipeline.from_pretrained(root).to("cpu")


def test_large_image_matches_diffusers_pipeline(large_pair):
    ours, theirs = large_pair
    assert ours.defaults.shift == 3.0  # diffusers' scheduler_config shift, which both then run
    assert_image_matches_diffusers(ours, theirs, cfg=4.5, seed=5, pixels=1 / 255)


def test_server_info_names_the_release(family, tmp_path):
    from fastapi.testclient import TestClient

    from sd35.server.app import create_app
    from sd35.server.catalog import ModelCatalog
    from sd35.server.engine import Engine
    from sd35.server.settings import ServerSettings

    pipe = _load(family, "large-turbo", variant="large")  # loaded as Large, whatever its file says
    models = tmp_path / "models"
    models.mkdir()
    for release in ("large-turbo", "sd3-medium"):
        shutil.copy(family[release][1], models / f"tiny-{release}.safetensors")
    (models / "broken.safetensors").write_bytes(b"<html>Access denied</html>")
    settings = ServerSettings(data_dir=tmp_path / "data", models_dir=models)
    catalog = ModelCatalog(pipe.model_name, family["large-turbo"][1], models)
    engine = Engine(settings, catalog, pipe, pipe.model_name, lambda name: pipe)
    with TestClient(create_app(settings, engine)) as client:
        info = client.get("/v1/info").json()
        listed = {m["title"]: m["variant"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert info["variant"] == "SD3.5 Large"
    d = info["defaults"]
    assert (d["preset"], d["steps"], d["cfg"], d["sampler"]) == ("sd3.5_large", 40, 4.5, "dpmpp_2m")
    assert listed == {
        pipe.model_name: "SD3.5 Large",  # the loaded model as it was loaded
        "tiny-large-turbo": "SD3.5 Large Turbo",  # the others as their files say
        "tiny-sd3-medium": "SD3 Medium",
        "broken": None,  # listed all the same; loading it says what is wrong
    }


def test_a_gguf_says_which_release_it_is_by_its_general_name(family, tmp_path):
    from tests.loading.test_gguf_models import write_gguf

    pytest.importorskip("gguf")
    w, official, diffusers = family["large"]
    path = tmp_path / "model-Q8_0.gguf"
    write_gguf(path, w.mmditx, "Q8_0", name="stable-diffusion-3.5-large-turbo")
    pipe = load_pipeline(
        path, official.parent / "text_encoders", tokenizers=diffusers, vae=diffusers / "vae", device="cpu"
    )
    assert pipe.identity.variant == "large-turbo" and "general.name" in pipe.identity.evidence
    assert (pipe.defaults.steps, pipe.defaults.cfg, pipe.defaults.sampler) == (4, 1.0, "euler")
