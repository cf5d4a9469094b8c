"""Which SD3 release a network is, from the shapes of the real releases, the names files carry, and the user's word."""

from __future__ import annotations

import dataclasses

import pytest

from sd35.errors import InvalidRequest
from sd35.models.configs import medium_mmditx_config, tiny_configs
from sd35.models.family import identify, variant_from_text
from sd35.presets import defaults_for

SD35_MEDIUM = medium_mmditx_config()
SD3_MEDIUM = dataclasses.replace(SD35_MEDIUM, pos_embed_max_size=192, qk_norm=False, attn2_layers=())
SD35_LARGE = dataclasses.replace(
    SD35_MEDIUM, hidden_size=2432, depth=38, pos_embed_max_size=192, mlp_hidden=9728, attn2_layers=()
)
TINY_LARGE = tiny_configs(attn2_layers=(), qk_norm=True).mmditx


@pytest.mark.parametrize(
    "cfg,variant,defaults",
    [  # REFERENCE.md 2.6, sd3_infer.py CONFIGS: steps, cfg, sampler, shift
        (SD35_MEDIUM, "medium", (50, 5.0, "dpmpp_2m", 3.0)),
        (SD35_LARGE, "large", (40, 4.5, "dpmpp_2m", 3.0)),
        (SD3_MEDIUM, "sd3-medium", (50, 5.0, "dpmpp_2m", 1.0)),
    ],
)
def test_real_releases_are_named_by_shape_with_their_defaults(cfg, variant, defaults):
    who = identify(cfg)
    assert (who.variant, who.evidence) == (variant, "its shapes")
    d = defaults_for(cfg, None, who.variant)
    assert (d.steps, d.cfg, d.sampler, d.shift) == defaults
    assert (d.width, d.height) == (1024, 1024)
    # shapes decide over a name that says otherwise
    assert identify(cfg, name="sd3_medium" if variant != "sd3-medium" else "sd3.5_large").variant == variant


@pytest.mark.parametrize(
    "metadata,name",
    [
        ({"modelspec.title": "Stable Diffusion 3.5 Large Turbo"}, ""),
        ({"modelspec.architecture": "stable-diffusion-v3.5-large", "general.name": "sd3.5 large turbo"}, ""),
        ({"modelspec.architecture": "stable-diffusion-v3.5-large"}, "sd3.5_large_turbo"),
        (None, "sd3.5_large_turbo-Q4_0"),
    ],
)
def test_large_turbo_is_large_that_says_so(metadata, name):
    who = identify(SD35_LARGE, metadata, name)
    assert who.variant == "large-turbo" and who.title == "SD3.5 Large Turbo"
    d = defaults_for(SD35_LARGE, None, who.variant)
    assert (d.steps, d.cfg, d.sampler, d.shift, d.name) == (4, 1.0, "euler", 3.0, "sd3.5_large_turbo")
    assert identify(SD35_LARGE, {"modelspec.architecture": "stable-diffusion-v3.5-large"}).variant == "large"


@pytest.mark.parametrize(
    "text,variant",
    [
        ("sd3.5_large_turbo", "large-turbo"),
        ("Stable Diffusion 3.5 Large", "large"),
        ("stable-diffusion-v3.5-large", "large"),
        ("sd3.5_medium", "medium"),
        ("stable-diffusion-v3.5-medium", "medium"),
        ("stable-diffusion-v3-medium", "sd3-medium"),
        ("sd3_medium_incl_clips_t5xxlfp8", "sd3-medium"),
        ("Stable Diffusion 3 Medium", "sd3-medium"),
        ("my_model", None),
        ("flux1-dev", None),
    ],
)
def test_names_of_releases(text, variant):
    assert variant_from_text(text) == variant


def test_a_toy_network_is_named_only_by_a_release_it_is_built_like():
    assert identify(TINY_LARGE).variant is None
    assert identify(TINY_LARGE, name="sd3.5_large").variant == "large"
    assert identify(TINY_LARGE, name="sd3_medium").variant is None  # SD3 Medium has no qk-norm
    who = identify(TINY_LARGE, {"modelspec.title": "SD3.5 Medium"}, "sd3.5_large")
    assert who.variant == "large" and who.evidence == "the name 'sd3.5_large'"
    # a release's sampling at a size its position grid allows
    d = defaults_for(TINY_LARGE, None, "large")
    assert (d.steps, d.cfg, d.width, d.trained_size) == (40, 4.5, 512, 512)


def test_the_variant_option_wins_where_the_network_allows_it():
    assert (
        identify(SD35_LARGE, {"modelspec.title": "SD3.5 Large"}, override="large-turbo").variant
        == "large-turbo"
    )
    with pytest.raises(InvalidRequest, match="not built like SD3.5 Medium") as e:
        identify(SD35_LARGE, override="medium")
    assert e.value.param == "variant"
    with pytest.raises(InvalidRequest, match="unknown model variant 'xl'; use one of medium, large"):
        identify(SD35_LARGE, override="xl")
