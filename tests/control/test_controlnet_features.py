"""ControlNet with the rest of the pipeline: SLG, APG, img2img, inpainting, hires fix, samplers, LoRA and the
memory modes (the ControlNet's weights follow them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd35 import load_pipeline
from sd35.control.unit import ControlUnit
from sd35.errors import NotFound
from sd35.lora import save_lora
from sd35.models.configs import tiny_configs
from sd35.request import Edit, HiresFix, LoraRef
from sd35.sampling.guidance import APG, SkipLayerGuidance
from tests.control.control_helpers import diffusers_controlnet, write_controlnet
from tests.helpers import generate_with_latent, rel_err
from tests.lora.lora_helpers import lora_models, mixed_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    return write_controlnet(
        diffusers_controlnet(tiny_configs().mmditx, seed=9), tmp_path_factory.mktemp("cn") / "cn"
    )


def unit(cn, **kw) -> ControlUnit:
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return ControlUnit(model=str(cn), image=image, **kw)


def latent(pipe, **kw) -> torch.Tensor:
    base = dict(width=32, height=32, steps=3, cfg=3.0, seed=5)
    return generate_with_latent(pipe, "a cat", **{**base, **kw})[1]


INIT = Image.new("RGB", (32, 32), (200, 40, 40))
MASK = Image.new("L", (32, 32), 0)
MASK.paste(255, (8, 8, 24, 24))
CASES = {
    "slg": dict(slg=SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, end=1.0)),
    "apg": dict(apg=APG(eta=0.5)),
    "img2img": dict(edit=Edit(image=INIT, strength=0.7)),
    "inpaint": dict(edit=Edit(image=INIT, mask=MASK)),
    "hires": dict(hires=HiresFix(scale=1.5, strength=0.5), steps=2),
    "euler_ancestral": dict(sampler="euler_ancestral"),
    "dpmpp_2m_sde": dict(sampler="dpmpp_2m_sde"),
    "heun": dict(sampler="heun"),
    "no-cfg": dict(cfg=1.0),
    "fbcache": dict(cache="fbcache:0.05"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_controlnet_acts_with(tiny_pipe, cn, case):
    kw = CASES[case]
    with_cn = latent(tiny_pipe, controls=(unit(cn, preprocess="canny"),), **kw)
    without = latent(tiny_pipe, **kw)
    assert with_cn.shape == without.shape and torch.isfinite(with_cn).all()
    assert rel_err(with_cn, without) > 1e-3


def test_window_outside_all_steps_is_no_controlnet(tiny_pipe, cn):
    # 3 steps: step i is kept when i/3 >= 0.9 and (i+1)/3 <= 1, never
    late = latent(tiny_pipe, controls=(unit(cn, start=0.9),))
    assert torch.equal(late, latent(tiny_pipe))
    assert not torch.equal(latent(tiny_pipe, controls=(unit(cn, start=0.6),)), latent(tiny_pipe))


def test_controlnet_with_a_lora(tiny_pipe, cn, tmp_path):
    path = save_lora(tmp_path / "style.safetensors", mixed_lora(lora_models(tiny_pipe)))
    lora = latent(tiny_pipe, loras=(LoraRef(str(path), 0.8),))
    both = latent(tiny_pipe, loras=(LoraRef(str(path), 0.8),), controls=(unit(cn),))
    assert rel_err(both, lora) > 1e-3


@pytest.mark.parametrize("memory", ["balanced", "low"])
def test_memory_modes_give_the_same_image(tiny, tiny_pipe, cn, memory):
    pipe = load_pipeline(tiny["diffusers"], device="cpu", memory=memory)
    ref = latent(tiny_pipe, controls=(unit(cn),))
    got = latent(pipe, controls=(unit(cn),))
    assert rel_err(got, ref) <= 1e-5
    if memory == "low":  # the ControlNet's joint blocks stream like the MMDiT-X's
        assert len(pipe._control_streams) == 1


def test_unknown_controlnet_is_refused_before_sampling(tiny_pipe, tmp_path):
    with pytest.raises(NotFound, match="no such ControlNet"):
        tiny_pipe.generate("a cat", width=32, height=32, steps=1, controls=(unit(tmp_path / "nope"),))
