"""The VAE against diffusers' AutoencoderKL (an independent implementation), plus loading and layout tests."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from sd35.errors import CheckpointError, SD35Error
from sd35.loading.diffusers_vae import is_diffusers_vae, is_official_vae, vae_from_diffusers, vae_to_diffusers
from sd35.loading.tensors import LazyTensor, materialize
from sd35.models.random_init import random_state_dict, randomize_
from sd35.models.vae import (
    LATENT_SCALE,
    LATENT_SHIFT,
    VAE,
    VAEConfig,
    latent_to_model,
    model_to_latent,
)
from tests.helpers import assert_rel_close

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

MATCH = 1e-5  # diffusers' AutoencoderKL and ours, both float32: rounding only

CONFIGS = {
    "two_levels": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=16),
    "three_levels": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16),
}


def diffusers_vae(cfg: VAEConfig) -> AutoencoderKL:
    levels = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    """(config, our official-layout state dict, our VAE, diffusers' VAE loaded by diffusers' own converter)."""
    cfg = CONFIGS[request.param]
    sd = random_state_dict(VAE(cfg), seed=1)
    ours = VAE.from_state_dict(sd)
    theirs = diffusers_vae(cfg)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(dict(sd), theirs.config), strict=True)
    return cfg, sd, ours, theirs


# ------------------------------------------------------------------ numerics vs diffusers


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_encode_matches_diffusers(case, hw):
    cfg, _, ours, theirs = case
    image = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        expected = theirs.encode(image).latent_dist.mean
    got = ours.encode(image)
    f = cfg.downscale
    assert got.shape == (2, cfg.z_channels, hw[0] // f, hw[1] // f)
    assert_rel_close(got, expected, MATCH)


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_decode_matches_diffusers(case, hw):
    cfg, _, ours, theirs = case
    z = torch.randn(2, cfg.z_channels, *hw, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, hw[0] * cfg.downscale, hw[1] * cfg.downscale)
    assert_rel_close(got, expected, MATCH)


def test_loads_diffusers_own_state_dict(case):
    """Our diffusers mapper applied to diffusers' own (independently randomised) weights gives the same VAE."""
    cfg, _, _, _ = case
    theirs = randomize_(diffusers_vae(cfg), seed=7)
    ours = VAE.from_state_dict(vae_from_diffusers(theirs.state_dict()))
    assert ours.config == cfg
    z = torch.randn(1, cfg.z_channels, 4, 6, generator=torch.Generator().manual_seed(5))
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        assert_rel_close(ours.decode(z), theirs.decode(z).sample, MATCH)
        assert_rel_close(ours.encode(image), theirs.encode(image).latent_dist.mean, MATCH)


# ------------------------------------------------------------------ layouts


def test_diffusers_round_trip_is_exact(case):
    cfg, sd, _, theirs = case
    dif = vae_to_diffusers(sd)
    reference = theirs.state_dict()
    assert set(dif) == set(reference)
    assert {k: tuple(v.shape) for k, v in dif.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    back = vae_from_diffusers(dif)
    assert set(back) == set(sd)
    for k, v in back.items():
        assert isinstance(v, LazyTensor)
        assert v.shape == tuple(sd[k].shape), k
        assert torch.equal(materialize(v), sd[k]), k
    assert is_official_vae(sd) and not is_diffusers_vae(sd)
    assert is_diffusers_vae(dif) and not is_official_vae(dif)


def test_diffusers_layout_loads_through_the_map(case):
    cfg, sd, ours, _ = case
    other = VAE.from_state_dict(vae_from_diffusers(vae_to_diffusers(sd)))
    for (k, a), (_, b) in zip(ours.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_old_diffusers_attention_names():
    cfg = CONFIGS["two_levels"]
    sd = random_state_dict(VAE(cfg), seed=2)
    old = {}
    for k, v in vae_to_diffusers(sd).items():
        k = k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
        old[k.replace("to_out.0.", "proj_attn.")] = v
    back = vae_from_diffusers(old)
    assert all(torch.equal(materialize(back[k]), sd[k]) for k in sd)


def test_diffusers_mapper_errors():
    cfg = CONFIGS["two_levels"]
    dif = vae_to_diffusers(random_state_dict(VAE(cfg), seed=2))
    with pytest.raises(CheckpointError, match="quant_conv"):
        vae_from_diffusers({**dif, "quant_conv.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(CheckpointError, match=re.escape("'decoder.mid_block.surprise.weight'")):
        vae_from_diffusers({**dif, "decoder.mid_block.surprise.weight": torch.zeros(1)})


# ------------------------------------------------------------------ behaviour and loading


def test_sampling(case):
    cfg, _, ours, _ = case
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    a = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(9))
    b = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(9))
    c = ours.encode(image, sample=True, generator=torch.Generator().manual_seed(10))
    mean = ours.encode(image)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, mean)
    assert a.shape == mean.shape


def test_decoder_only_and_encoder_only(case):
    cfg, sd, ours, _ = case
    dec = VAE.from_state_dict({k: v for k, v in sd.items() if k.startswith("decoder.")})
    assert dec.config == dataclasses.replace(cfg, has_encoder=False)
    assert dec.encoder is None
    z = torch.randn(1, cfg.z_channels, 4, 4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(dec.decode(z), ours.decode(z))
    with pytest.raises(CheckpointError, match="only the decoder"):
        dec.encode(torch.zeros(1, 3, 16, 16))

    enc = VAE.from_state_dict({k: v for k, v in sd.items() if k.startswith("encoder.")})
    assert enc.decoder is None and enc.config.ch_mult == cfg.ch_mult
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    assert torch.equal(enc.encode(image), ours.encode(image))
    with pytest.raises(CheckpointError, match="only the encoder"):
        enc.decode(z)


def test_image_size_must_fit_downscale(case):
    cfg, _, ours, _ = case
    bad = cfg.downscale + cfg.downscale // 2
    with pytest.raises(SD35Error, match="not a multiple"):
        ours.encode(torch.zeros(1, 3, 16, bad))


def test_wrong_shape_names_the_key():
    cfg = CONFIGS["two_levels"]
    sd = random_state_dict(VAE(cfg), seed=2)
    sd["decoder.mid.attn_1.k.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match=re.escape("decoder.mid.attn_1.k.weight")):
        VAE.from_state_dict(sd)


def test_prefix_and_whole_checkpoint():
    cfg = CONFIGS["two_levels"]
    sd = random_state_dict(VAE(cfg), seed=2)
    plain = VAE.from_state_dict(sd)
    prefixed = {f"first_stage_model.{k}": v for k, v in sd.items()}
    prefixed["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(4)  # other parts are ignored
    other = VAE.from_state_dict(prefixed)
    assert other.config == plain.config
    for (k, a), (_, b) in zip(plain.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_meta_build_dtype_and_lazy_inputs():
    cfg = CONFIGS["two_levels"]
    sd = random_state_dict(VAE(cfg), seed=2)
    lazy_sd = {k: LazyTensor(tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sd.items()}
    assert VAEConfig.from_state_dict(lazy_sd) == cfg
    vae = VAE.from_state_dict(lazy_sd, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in vae.parameters())
    out = vae.encode(torch.zeros(1, 3, 16, 16))  # float32 input is cast
    assert out.dtype == torch.bfloat16
    assert vae.decode(out.float()).dtype == torch.bfloat16


def test_rejects_sd1_style_vae():
    cfg = CONFIGS["two_levels"]
    sd = random_state_dict(VAE(cfg), seed=2)
    sd["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointError, match="quant_conv"):
        VAE.from_state_dict(sd)


def test_latent_format():
    z = torch.randn(2, 16, 3, 3)
    assert torch.allclose(model_to_latent(latent_to_model(z)), z, atol=1e-6)
    assert latent_to_model(torch.tensor(LATENT_SHIFT)).item() == 0.0
    assert torch.allclose(latent_to_model(torch.tensor(1.0)), torch.tensor((1.0 - 0.0609) * 1.5305))
    assert LATENT_SCALE == 1.5305
