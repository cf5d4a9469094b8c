"""``sd35 train`` on the tiny random models: the loss falls, resuming is exact, the objective's statistics,
the position-grid crop, the saved files load, the config rejects bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35 import load_pipeline
from sd35.cli.train import main_train
from sd35.errors import SD35Error
from sd35.models.mmditx import MMDiTX
from sd35.train.checkpoint import list_checkpoints
from sd35.train.config import TrainConfig, parse_config
from sd35.train.loss import FlowLoss, draw, loss_weights, pos_offset, sample_sigmas, shift_sigmas
from sd35.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 captioned 64x64 images: a coloured background with a square of another colour."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        a = np.zeros((64, 64, 3), np.uint8)
        a[...] = rng.integers(0, 256, 3)
        top, left = rng.integers(0, 32, 2)
        a[top : top + 32, left : left + 32] = rng.integers(0, 256, 3)
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a square, picture {i}", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cfg(tiny, data_dir, cache_dir, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(tiny["diffusers"]),
        data_dir=str(data_dir),
        cache_dir=str(cache_dir),
        output_dir=str(out),
        resolution=64,
        batch_size=4,
        mixed_precision="no",
        device="cpu",
        lora_rank=4,
        save_dtype="fp32",
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _pipe(tiny):
    return load_pipeline(tiny["diffusers"], device="cpu")


def _mean(xs):
    return sum(xs) / len(xs)


def _predict(mmditx):
    g = torch.Generator().manual_seed(5)
    cfg = mmditx.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    y = torch.randn(2, cfg.pooled_dim, generator=g)
    ctx = torch.randn(2, 20, cfg.context_dim, generator=g)
    with torch.no_grad():
        return mmditx(x, torch.tensor([300.0, 800.0]), y, ctx)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("mode", ["lora", "dora", "full"])
def test_loss_falls_and_outputs_load(tiny, data_dir, cache_dir, tmp_path, mode):
    from sd35.lora import load_lora

    out = tmp_path / "run"
    lr = 1e-3 if mode == "full" else 1e-2
    validation = dict(
        validation_prompts=["a square"],
        validation_every=20,
        validation_steps=3,
        validation_slg_layers=[1],
    )
    cfg = _cfg(
        tiny, data_dir, cache_dir, out,
        mode="full" if mode == "full" else "lora", dora=mode == "dora", max_steps=40, learning_rate=lr,
        **(validation if mode == "lora" else {}),
    )  # fmt: skip
    pipe = _pipe(tiny)
    result = train(cfg, pipe)
    losses = result.losses
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert _mean(losses[-5:]) < 0.7 * _mean(losses[:5]), losses
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and log[-1]["loss"] == losses[-1]

    trained = _predict(pipe.mmditx)
    fresh = _pipe(tiny)
    if mode == "full":
        assert [p.name for p in result.outputs] == ["sd35_full.safetensors"]
        loaded = load_pipeline(
            result.outputs[0], text_encoders=tiny["text_encoders"], tokenizers=tiny["diffusers"], device="cpu"
        )
        torch.testing.assert_close(_predict(loaded.mmditx), trained, rtol=0, atol=1e-5)
        assert not torch.allclose(_predict(fresh.mmditx), trained, atol=1e-3)
        for k, v in loaded.vae.state_dict().items():  # the base model's VAE rides along
            assert torch.equal(v, fresh.vae.state_dict()[k])
        return
    names = ["sd35_lora.safetensors"] + (["sd35_lora_diffusers.safetensors"] if mode == "lora" else [])
    assert [p.name for p in result.outputs] == names
    for path in result.outputs:  # each file, applied to a fresh model, gives the trained model's output
        model = _pipe(tiny).mmditx
        report = load_lora({"mmditx": model}, path)
        assert report.layers["mmditx"] > 0 and not report.unmatched
        torch.testing.assert_close(_predict(model), trained, rtol=0, atol=1e-5)
    if mode == "lora":
        pngs = sorted(p.name for p in (out / "samples").glob("*.png"))
        assert pngs == ["step00000020-00.png", "step00000040-00.png"] == [p.name for p in result.samples]
        with Image.open(out / "samples" / pngs[-1]) as im:
            assert im.size == (64, 64)
            assert "SLG layers: 1" in im.info["parameters"]


def test_resume_is_exact(tiny, data_dir, cache_dir, tmp_path):
    """A run resumed from its step-4 checkpoint ends with the same weights, EMA and losses, bit for bit."""
    kw = dict(
        max_steps=8, batch_size=2, gradient_accumulation=2, learning_rate=1e-2, save_every=4, ema=True,
        ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=2, caption_dropout=0.3, pos_embed_crop=True,
    )  # fmt: skip
    a = train(_cfg(tiny, data_dir, cache_dir, tmp_path / "a", **kw), _pipe(tiny))
    steps = [s for s, _ in list_checkpoints(tmp_path / "a")]
    assert steps == [4, 8]
    b_dir = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000004", b_dir / "step-00000004")
    b = train(_cfg(tiny, data_dir, cache_dir, tmp_path / "b", resume="latest", **kw), _pipe(tiny))
    assert b.start_step == 4 and b.step == 8
    assert b.losses == a.losses[4:]
    assert a.trainable.keys() == b.trainable.keys()
    for k in a.trainable:
        assert torch.equal(a.trainable[k], b.trainable[k]), k
    from safetensors.torch import load_file

    for pa, pb in zip(a.outputs, b.outputs, strict=True):  # the saved (EMA) LoRAs too
        ta, tb = load_file(str(pa)), load_file(str(pb))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)

    # a finished run is never trained over, not even by resuming
    with pytest.raises(SD35Error, match="already holds a finished run"):
        train(_cfg(tiny, data_dir, cache_dir, tmp_path / "b", resume="latest", **kw))


def test_gradient_checkpointing_and_bf16(tiny, data_dir, cache_dir, tmp_path):
    kw = dict(max_steps=3, learning_rate=1e-2)
    plain = train(_cfg(tiny, data_dir, cache_dir, tmp_path / "a", **kw), _pipe(tiny))
    ckpt = train(
        _cfg(tiny, data_dir, cache_dir, tmp_path / "b", gradient_checkpointing=True, **kw), _pipe(tiny)
    )
    for k in plain.trainable:
        torch.testing.assert_close(ckpt.trainable[k], plain.trainable[k], rtol=0, atol=1e-5)
    again = train(_cfg(tiny, data_dir, cache_dir, tmp_path / "c", **kw), _pipe(tiny))
    assert again.losses == plain.losses  # seeded and deterministic
    bf16 = train(_cfg(tiny, data_dir, cache_dir, tmp_path / "d", mixed_precision="bf16", **kw), _pipe(tiny))
    assert all(math.isfinite(v) for v in bf16.losses)
    assert bf16.losses != plain.losses and abs(bf16.losses[0] - plain.losses[0]) < 0.05 * plain.losses[0]


# ------------------------------------------------------------------------------------------ the objective


def test_logit_normal_sampling_statistics():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(200_000, "logit_normal", g)
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean())) < 0.01 and abs(float(logit.std()) - 1.0) < 0.01
    assert abs(float(s.median()) - 0.5) < 0.005 and float(s.min()) > 0 and float(s.max()) < 1
    s2 = sample_sigmas(200_000, "logit_normal", g, logit_mean=1.0, logit_std=0.5)
    logit2 = torch.log(s2 / (1 - s2))
    assert abs(float(logit2.mean()) - 1.0) < 0.01 and abs(float(logit2.std()) - 0.5) < 0.01
    # the shift maps the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    shifted = sample_sigmas(200_000, "logit_normal", g, shift=3.0)
    assert abs(float(shifted.median()) - 0.75) < 0.005
    assert torch.allclose(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    u = sample_sigmas(200_000, "uniform", g)
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    mode = sample_sigmas(200_000, "mode", g)  # symmetric, heavier in the middle than uniform
    assert abs(float(mode.mean()) - 0.5) < 0.005
    middle = float(((mode > 0.4) & (mode < 0.6)).float().mean())
    assert middle > 0.3
    sig = torch.tensor([0.25, 0.5])
    assert torch.equal(loss_weights(sig, "none"), torch.ones(2))
    assert torch.allclose(loss_weights(sig, "sigma_sqrt"), torch.tensor([16.0, 4.0]))
    assert torch.allclose(loss_weights(sig, "cosmap"), 2 / (math.pi * (1 - 2 * sig + 2 * sig**2)))


def test_draws_are_per_sample_and_reproducible():
    obj = FlowLoss()
    a = draw(obj, (2, 4, 8, 8), seed=1, step=3, micro=0, first_index=5)
    b = draw(obj, (1, 4, 8, 8), seed=1, step=3, micro=0, first_index=6)
    assert torch.equal(a.noise[1:], b.noise) and torch.equal(a.sigmas[1:], b.sigmas) and a.crop == b.crop
    c = draw(obj, (2, 4, 8, 8), seed=1, step=4, micro=0, first_index=5)
    assert not torch.equal(a.noise, c.noise) and a.crop != c.crop
    drops = draw(obj, (400, 1, 1, 1), 0, 0, 0, 0, caption_dropout=0.25).drop
    assert 0.15 < float(drops.float().mean()) < 0.35
    assert not draw(obj, (50, 1, 1, 1), 0, 0, 0, 0, caption_dropout=0.0).drop.any()


def test_pos_embed_crop_offsets_in_range_and_used(tiny, data_dir, cache_dir, tmp_path, monkeypatch):
    grid = 32
    uniforms = np.linspace(0, 0.9999, 50)
    seen = {pos_offset(grid, 4, 6, a, b) for a in uniforms for b in uniforms}
    # every offset that fits, and only those
    assert seen == {(t, left) for t in range(grid - 4 + 1) for left in range(grid - 6 + 1)}
    assert pos_offset(grid, grid, grid, 0.7, 0.3) == (0, 0)
    with pytest.raises(SD35Error):
        pos_offset(grid, grid + 1, 2, 0.0, 0.0)

    calls = []
    forward = MMDiTX.forward

    def spy(self, x, t, y, context, skip_layers=(), pos_offset=None):
        if torch.is_grad_enabled():
            calls.append((tuple(x.shape[-2:]), pos_offset))
        return forward(self, x, t, y, context, skip_layers, pos_offset)

    monkeypatch.setattr(MMDiTX, "forward", spy)
    train(_cfg(tiny, data_dir, cache_dir, tmp_path / "a", max_steps=6, pos_embed_crop=True), _pipe(tiny))
    assert len(calls) == 6
    offsets = [off for _, off in calls]
    latent_grid = 8 // 2  # 64 px -> 8x8 latent -> 4x4 tokens
    assert all(off is not None and 0 <= off[0] <= grid - latent_grid and 0 <= off[1] <= grid - latent_grid
               for off in offsets)  # fmt: skip
    assert len(set(offsets)) > 1 and any(off != ((grid - 4) // 2,) * 2 for off in offsets)
    calls.clear()
    train(_cfg(tiny, data_dir, cache_dir, tmp_path / "b", max_steps=2), _pipe(tiny))
    assert [off for _, off in calls] == [None, None]  # off by default: the centred crop


# ------------------------------------------------------------------------------------------ config


def test_config_from_toml_and_flags(tmp_path):
    toml = tmp_path / "cfg.toml"
    toml.write_text(
        'model = "base"\n'
        "[data]\n"
        'data_dir = "imgs"\n'
        "batch_size = 2\n"
        "[optimizer]\n"
        "learning_rate = 1e-4\n"
        "[lora]\n"
        "lora_rank = 8\n"
        'lora_targets = ["attn.qkv", "attn2.qkv"]\n'
        "[output]\n"
        'output_dir = "/abs/run"\n',
        encoding="utf-8",
    )
    cfg = parse_config(["--config", str(toml), "--learning-rate", "5e-5", "--ema", "--lora-blocks", "0", "2"])
    assert cfg.learning_rate == 5e-5 and cfg.ema is True and cfg.lora_blocks == [0, 2]
    assert cfg.lora_rank == 8 and cfg.batch_size == 2 and cfg.lora_targets == ["attn.qkv", "attn2.qkv"]
    # relative paths are relative to the file's folder
    assert cfg.model == str(tmp_path / "base") and cfg.data_dir == str(tmp_path / "imgs")
    assert cfg.output_dir == "/abs/run" and cfg.alpha == 8.0 and cfg.name == "sd35_lora"
    flat = parse_config(["--model", "m", "--data-dir", "d", "--output-dir", "o", "--pos-embed-crop", "false"])
    assert flat.pos_embed_crop is False and flat.timestep_sampling == "logit_normal" and flat.shift == 1.0
    assert TrainConfig.from_dict(flat.to_dict()) == flat


@pytest.mark.parametrize(
    "toml,flags,match",
    [
        ("learnin_rate = 1e-4\n", [], "unknown key 'learnin_rate'.*learning_rate"),
        ("[lora]\nlearning_rate = 1e-4\n", [], "belongs in \\[optimizer\\]"),
        ("[trainer]\nseed = 1\n", [], "unknown section \\[trainer\\]"),
        ("lora_rank = '16'\n", [], "lora_rank must be an integer"),
        ("lora_rank = 16\nlora_rank = 8\n", [], "not valid TOML"),
        ("", ["--learnin-rate", "1e-4"], "unknown option.*--learnin-rate.*learning_rate"),
        ("", ["--learning-rate", "-1e-4"], "learning_rate must be a finite number > 0"),
        ("", ["--learning-rate", "fast"], "--learning-rate: expected a number"),
        ("", ["--lora-rank", "0"], "lora_rank must be at least 1"),
        ("", ["--mode", "half"], "mode must be one of lora, full"),
        ("", ["--caption-dropout", "1.5"], "caption_dropout must be in"),
        ("", ["--mode", "lora", "--fsdp"], "fsdp = true is for mode = full"),
        ("", ["--mode", "full", "--model-dtype", "bf16"], "fp32 master weights"),
        ("", ["--resolution", "100"], "resolution must be a multiple of 16"),
        ("", ["--timestep-sampling", "cosine"], "timestep_sampling must be one of"),
    ],
)
def test_config_errors(tmp_path, toml, flags, match):
    path = tmp_path / "cfg.toml"
    path.write_text('model = "m"\ndata_dir = "d"\noutput_dir = "o"\n' + toml, encoding="utf-8")
    with pytest.raises(SD35Error, match=match):
        parse_config(["--config", str(path), *flags])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main_train(["--model", "m", "--data-dir", "d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd35: error: output_dir is required") and err.count("\n") == 1
    assert main_train(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main_train(["--help"]) == 0
    assert "--learning-rate" in capsys.readouterr().out


def test_output_folder_and_packages_are_checked_first(tiny, data_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "sd35_lora.safetensors").write_bytes(b"x")
    with pytest.raises(SD35Error, match="already holds a finished run"):
        train(_cfg(tiny, data_dir, cache_dir, out))
    (out / "sd35_lora.safetensors").unlink()
    (out / "checkpoints" / "step-00000010").mkdir(parents=True)
    (out / "checkpoints" / "step-00000010" / "state.pt").write_bytes(b"x")
    with pytest.raises(SD35Error, match="--resume latest"):
        train(_cfg(tiny, data_dir, cache_dir, out))
    (out / "checkpoints" / "step-00000020").mkdir()
    (out / "checkpoints" / "step-00000020" / "state.pt").write_bytes(b"x")
    with pytest.raises(SD35Error, match="later checkpoints \\(steps 20\\)"):
        train(_cfg(tiny, data_dir, cache_dir, out, resume=str(out / "checkpoints" / "step-00000010")))
    with pytest.raises(SD35Error, match="holds no checkpoint"):
        train(_cfg(tiny, data_dir, cache_dir, tmp_path / "empty", resume="latest"))
    with pytest.raises(SD35Error, match="not a training checkpoint"):
        train(_cfg(tiny, data_dir, cache_dir, tmp_path / "x", resume=str(tmp_path)))
    with pytest.raises(SD35Error, match="validation_slg_layers: .*\\[7, 8, 9\\] do not exist"):
        train(_cfg(tiny, data_dir, cache_dir, tmp_path / "v", validation_prompts=["a"]), _pipe(tiny))
    assert not (tmp_path / "v").exists()  # refused before the output folder was made
    with pytest.raises(SD35Error, match="resolution 1024 px is larger than this model's images") as e:
        train(_cfg(tiny, data_dir, cache_dir, tmp_path / "r", resolution=1024), _pipe(tiny))
    assert "at most 512" in str(e.value) and not (tmp_path / "r").exists()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(SD35Error, match="pip install bitsandbytes"):
            train(_cfg(tiny, data_dir, cache_dir, tmp_path / "y", optimizer="adamw8bit"))
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        with pytest.raises(SD35Error, match="pip install tensorboard"):
            train(_cfg(tiny, data_dir, cache_dir, tmp_path / "z", log_with="tensorboard"))


def test_text_encoders_offloaded_with_validation_prompts_remembered(tiny, tmp_path):
    """On a GPU the text encoders leave it after caching; the validation prompts' embeddings stay at hand."""
    from sd35.train.trainer import Trainer

    cfg = TrainConfig(model="m", data_dir="d", output_dir=str(tmp_path), validation_prompts=["a cat"],
                      validation_negative_prompt="blurry")  # fmt: skip
    pipe = _pipe(tiny)
    before = pipe.generate("a cat", "blurry", width=64, height=64, steps=2, seed=1)[0]
    Trainer(cfg)._offload_text_encoders(
        pipe
    )  # one private step of Trainer.run, which has no public seam for it
    calls = []
    forward = pipe.text.forward
    pipe.text.forward = lambda tokens: calls.append(1) or forward(tokens)
    after = pipe.generate("a cat", "blurry", width=64, height=64, steps=2, seed=1)[0]
    assert calls == [] and np.array_equal(np.asarray(before), np.asarray(after))
    pipe.generate("a dog", width=64, height=64, steps=1, seed=1)  # other prompts are still encoded
    assert calls == [1]
