"""Training data: data-set scanning, buckets, crops, the bucketed batch sampler and the latent/text cache."""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sd35.errors import SD35Error, SD35Warning
from sd35.image_io import read_image
from sd35.request import TextOptions
from sd35.train.cache import CachedDataset, build_cache, collate, pad_contexts
from sd35.train.data import (
    BucketBatchSampler,
    Crop,
    Sample,
    apply_crop,
    assign_bucket,
    crop_rng,
    make_buckets,
    place_samples,
    plan_crop,
    scan_dataset,
)
from tests.helpers import noise_image, sd35_warnings


def _png(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(width, height, seed).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# scanning


def test_folder_with_captions(tmp_path):
    _png(tmp_path / "b.png", 8, 8)
    (tmp_path / "b.txt").write_text("  a blue thing \n", encoding="utf-8")
    _png(tmp_path / "sub" / "a.png", 8, 8)
    (tmp_path / "sub" / "a.txt").write_text("\ufeffnested", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.JPG", format="JPEG")
    (tmp_path / "c.txt").write_text("jpeg", encoding="utf-8")
    _png(tmp_path / ".hidden" / "x.png", 8, 8)
    (tmp_path / "notes.md").write_text("ignored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = scan_dataset(tmp_path)
    assert samples == [
        Sample(tmp_path / "b.png", "a blue thing"),
        Sample(tmp_path / "c.JPG", "jpeg"),
        Sample(tmp_path / "sub" / "a.png", "nested"),
    ]


def test_jsonl_dataset(tmp_path):
    _png(tmp_path / "imgs" / "one.png", 8, 8)
    two = _png(tmp_path / "elsewhere" / "two.png", 8, 8)
    lines = [
        json.dumps({"image": "imgs/one.png", "caption": "first"}),
        "",
        json.dumps({"image": str(two), "text": "second"}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = scan_dataset(tmp_path / "data.jsonl")
    assert samples == sorted(
        [Sample(tmp_path / "imgs" / "one.png", "first"), Sample(two, "second")], key=lambda s: str(s.image)
    )


def test_missing_captions_one_warning(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png", 8, 8)
    (tmp_path / "b.txt").write_text("bee")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        samples = scan_dataset(tmp_path)
    messages = sd35_warnings(record)
    assert len(messages) == 1
    assert "2 of 3" in messages[0] and "a.png" in messages[0] and "c.png" in messages[0]
    assert [s.caption for s in samples] == ["", "bee", ""]


def test_orphan_caption_warning(tmp_path):
    _png(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.txt").write_text("ok")
    (tmp_path / "lonely.txt").write_text("no image")
    with pytest.warns(SD35Warning, match="lonely.txt"):
        samples = scan_dataset(tmp_path)
    assert samples == [Sample(tmp_path / "a.png", "ok")]


def test_dataset_errors(tmp_path):
    with pytest.raises(SD35Error, match="no such data set"):
        scan_dataset(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SD35Error, match="no images"):
        scan_dataset(empty)
    captions_only = tmp_path / "captions"
    captions_only.mkdir()
    (captions_only / "cat.txt").write_text("a cat")
    with pytest.raises(SD35Error, match=r"caption file\(s\) but no images.*cat\.txt"):
        scan_dataset(captions_only)


def test_malformed_jsonl_line(tmp_path):
    _png(tmp_path / "a.png", 8, 8)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "x"}) + '\n{"image": "a.png", caption\n')
    with pytest.raises(SD35Error, match="line 2"):
        scan_dataset(path)
    path.write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(SD35Error, match="line 1"):
        scan_dataset(path)
    path.write_text(json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    with pytest.raises(SD35Error, match=r"missing\.png \(line 1\)"):
        scan_dataset(path)


def test_corrupt_image_skipped_and_reported(tmp_path):
    good = _png(tmp_path / "good.png", 64, 64)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    samples = [Sample(bad, "bad"), Sample(good, "good")]
    with pytest.warns(SD35Warning, match=r"1 of 2 image\(s\) cannot be read.*bad\.png"):
        placed, skipped = place_samples(samples, make_buckets(128, 64))
    assert [i for i, _ in placed] == [1]
    assert [p for p, _ in skipped] == [bad] and skipped[0][1]


# --------------------------------------------------------------------------------------------------
# buckets and crops


@pytest.mark.parametrize("max_side", [512, 768, 1024, 1280])
def test_bucket_properties(max_side):
    buckets = make_buckets(max_side)
    assert (max_side, max_side) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= max_side * max_side
        assert min(w, h) >= 256 and max(w, h) / min(w, h) <= 4
        assert (h, w) in buckets
    assert len(set(buckets)) == len(buckets)


def test_1440_reachable_and_limits():
    buckets = make_buckets(1440)
    assert (1440, 1440) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 1440 * 1440 for w, h in buckets)
    assert assign_bucket(3000, 3000, buckets) == (1440, 1440)
    with pytest.raises(SD35Error, match="1440"):
        make_buckets(1536)
    with pytest.raises(SD35Error, match="multiple of 16"):
        make_buckets(1000)


def test_assign_picks_closest_ratio():
    buckets = make_buckets(1024)
    for width, height in [(1000, 1000), (1920, 1080), (1080, 1920), (640, 480), (3000, 500), (10, 90)]:
        chosen = assign_bucket(width, height, buckets)
        best = min(abs(math.log(w / h) - math.log(width / height)) for w, h in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(width / height)) == pytest.approx(best)
    assert assign_bucket(1920, 1080, buckets) == (1344, 768)
    assert assign_bucket(50, 100, [(64, 128), (128, 256), (128, 128)]) == (128, 256)  # tie: larger area


def test_crops():
    crop = plan_crop(300, 200, (128, 128))
    assert crop == Crop((300, 200), (192, 128), (128, 128), 32, 0)
    image = noise_image(300, 200, seed=0)
    expected = image.resize((192, 128), Image.LANCZOS).crop((32, 0, 160, 128))
    assert np.array_equal(np.asarray(apply_crop(image, crop)), np.asarray(expected))

    randoms = {plan_crop(300, 200, (128, 128), True, crop_rng(seed, "x.png")).left for seed in range(20)}
    assert len(randoms) > 3 and all(0 <= left <= 64 for left in randoms)
    again = plan_crop(300, 200, (128, 128), True, crop_rng(7, "x.png"))
    assert again == plan_crop(300, 200, (128, 128), True, crop_rng(7, "x.png"))


def test_transparency_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert read_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------------------------------
# the sampler


def _bucket_of(n=23, buckets=3, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(buckets) for _ in range(n)]


def test_sampler_single_bucket_batches_cover_epoch():
    bucket_of = _bucket_of()
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len({bucket_of[i] for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(bucket_of)))
    dropped = list(BucketBatchSampler(bucket_of, batch_size=4, seed=1, drop_last=True))
    assert all(len(b) == 4 for b in dropped)


def test_sampler_deterministic_per_seed_and_epoch():
    bucket_of = _bucket_of()

    def epoch(seed, e):
        s = BucketBatchSampler(bucket_of, batch_size=3, seed=seed)
        s.set_epoch(e)
        return list(s)

    assert epoch(5, 0) == epoch(5, 0)
    assert epoch(5, 2) == epoch(5, 2)
    assert epoch(5, 0) != epoch(5, 1)
    assert epoch(5, 0) != epoch(6, 0)
    sampler = BucketBatchSampler(bucket_of, batch_size=3, seed=5)
    first, second = list(sampler), list(sampler)  # runs on into the next epoch by itself
    assert (first, second) == (epoch(5, 0), epoch(5, 1)) and sampler.epoch == 2
    plain = list(BucketBatchSampler(bucket_of, batch_size=3, shuffle=False))
    assert plain == list(BucketBatchSampler(bucket_of, batch_size=3, shuffle=False, seed=9))


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_rank_sharding(drop_last):
    bucket_of = _bucket_of(n=40, buckets=4)
    world = 3
    per_rank = []
    for rank in range(world):
        s = BucketBatchSampler(
            bucket_of, batch_size=4, seed=3, drop_last=drop_last, rank=rank, world_size=world
        )
        s.set_epoch(2)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for b in batches for i in b]
    if drop_last:
        assert len(seen) == len(set(seen))  # disjoint
    else:
        assert set(seen) == set(range(len(bucket_of)))  # everything, a padded batch or two repeated
    if drop_last:  # the ranks take turns through the one-process epoch
        one = BucketBatchSampler(bucket_of, batch_size=4, seed=3, drop_last=True)
        one.set_epoch(2)
        interleaved = [batches[i] for i in range(len(per_rank[0])) for batches in per_rank]
        assert interleaved == list(one)[: len(interleaved)]


def test_sampler_resume_mid_epoch():
    bucket_of = _bucket_of(n=30)
    run = BucketBatchSampler(bucket_of, batch_size=2, seed=11)
    run.set_epoch(1)
    it = iter(run)
    done = [next(it) for _ in range(4)]
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint
    rest = list(it)
    next_epoch = list(run)

    resumed = BucketBatchSampler(bucket_of, batch_size=2, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a resumed loop calls this again: it must not restart the epoch
    assert list(resumed) == rest
    resumed.set_epoch(2)
    assert list(resumed) == next_epoch
    assert done + rest == run.epoch_batches(1)

    with pytest.warns(SD35Warning, match="changed"):
        BucketBatchSampler(bucket_of, batch_size=3, seed=11).load_state_dict(state)


def test_sampler_errors():
    with pytest.raises(SD35Error, match="too few"):
        BucketBatchSampler([0, 0, 1], batch_size=4, drop_last=True)
    with pytest.raises(SD35Error, match="rank"):
        BucketBatchSampler([0, 0], batch_size=1, rank=2, world_size=2)


# --------------------------------------------------------------------------------------------------
# the cache


@pytest.fixture
def counted(tiny_pipe, monkeypatch):
    """The tiny pipeline with its VAE encodes and prompt encodes counted (images and prompts)."""
    calls = {"vae": 0, "text": 0}
    encode, encode_prompt = tiny_pipe.vae.encode, tiny_pipe.encode_prompt

    def vae_encode(pixels, *a, **kw):
        calls["vae"] += pixels.shape[0]
        return encode(pixels, *a, **kw)

    def prompts(prompt, *a, **kw):
        calls["text"] += 1 if isinstance(prompt, str) else len(prompt)
        return encode_prompt(prompt, *a, **kw)

    monkeypatch.setattr(tiny_pipe.vae, "encode", vae_encode)
    monkeypatch.setattr(tiny_pipe, "encode_prompt", prompts)
    return tiny_pipe, calls


def _dataset(folder):
    _png(folder / "wide.png", 200, 60, seed=1)
    (folder / "wide.txt").write_text("a wide red thing")
    _png(folder / "square.png", 100, 90, seed=2)
    (folder / "square.txt").write_text("a square")
    _png(folder / "tall.png", 40, 150, seed=3)
    (folder / "tall.txt").write_text("a wide red thing")  # a caption shared with wide.png
    return scan_dataset(folder)


def test_cache_built_once_and_matches_pipeline(counted, tmp_path):
    pipe, calls = counted
    samples = _dataset(tmp_path / "data")
    buckets = make_buckets(128, 64)
    cache = tmp_path / "cache"
    ds = build_cache(pipe, samples, buckets, cache, t5_max_tokens=77, progress=False)
    assert isinstance(ds, CachedDataset) and len(ds) == 3 and ds.skipped == []
    assert calls == {"vae": 3, "text": 3}  # two distinct captions + the empty one
    assert [e.crop.bucket for e in ds.entries] == [(128, 128), (64, 256), (256, 64)]
    assert ds.bucket_of == [buckets.index(e.crop.bucket) for e in ds.entries]

    again = build_cache(pipe, samples, buckets, cache, t5_max_tokens=77, progress=False)
    assert calls == {"vae": 3, "text": 3}  # nothing encoded the second time
    assert again.entries == ds.entries

    with torch.no_grad():
        for i, entry in enumerate(ds.entries):
            item = ds[i]
            w, h = entry.crop.bucket
            assert item["bucket"] == (w, h) and item["caption"] == entry.sample.caption
            assert item["latent"].dtype == torch.float32 and item["latent"].shape == (16, h // 8, w // 8)
            expected = pipe.encode_image(apply_crop(read_image(entry.sample.image), entry.crop), w, h)[0]
            torch.testing.assert_close(item["latent"], expected, rtol=0, atol=0)
            context, pooled = pipe.encode_prompt([entry.sample.caption], TextOptions(t5_max_tokens=77))
            torch.testing.assert_close(item["context"], context[0], rtol=0, atol=0)
            torch.testing.assert_close(item["pooled"], pooled[0], rtol=0, atol=0)
        context, pooled = pipe.encode_prompt([""], TextOptions(t5_max_tokens=77))
        torch.testing.assert_close(ds.empty_text["context"], context[0], rtol=0, atol=0)
        torch.testing.assert_close(ds.empty_text["pooled"], pooled[0], rtol=0, atol=0)

    batch = collate([ds[0], ds[0]])
    assert batch["latent"].shape == (2, 16, 16, 16) and batch["context"].shape == (2, 154, 256)
    assert batch["pooled"].shape == (2, 192) and batch["bucket"] == (128, 128)
    with pytest.raises(SD35Error, match="mixes buckets"):
        collate([ds[0], ds[1]])


def test_cache_invalidation(counted, tmp_path):
    pipe, calls = counted
    data = tmp_path / "data"
    samples = _dataset(data)
    buckets = make_buckets(128, 64)
    cache = tmp_path / "cache"
    build_cache(pipe, samples, buckets, cache, t5_max_tokens=77, progress=False)
    calls.update(vae=0, text=0)

    (data / "square.txt").write_text("a changed caption")
    ds = build_cache(pipe, scan_dataset(data), buckets, cache, t5_max_tokens=77, progress=False)
    assert calls == {"vae": 0, "text": 1}
    assert ds[0]["caption"] == "a changed caption"

    _png(data / "square.png", 100, 90, seed=99)  # new pixels: new mtime and key
    build_cache(pipe, scan_dataset(data), buckets, cache, t5_max_tokens=77, progress=False)
    assert calls == {"vae": 1, "text": 1}

    build_cache(pipe, scan_dataset(data), buckets, cache, t5_max_tokens=100, progress=False)
    assert calls == {"vae": 1, "text": 4}  # another T5 limit: all captions again, no images


def test_cache_skips_broken_images(counted, tmp_path):
    pipe, calls = counted
    data = tmp_path / "data"
    _png(data / "good.png", 64, 64)
    (data / "garbage.png").write_bytes(b"\x00garbage" * 50)
    _png(data / "truncated.png", 64, 64, seed=5)
    whole = (data / "truncated.png").read_bytes()
    (data / "truncated.png").write_bytes(whole[: len(whole) // 2])  # a readable header, broken pixels
    with pytest.warns(SD35Warning, match="no caption"):
        samples = scan_dataset(data)
    cache = tmp_path / "cache"
    with pytest.warns(SD35Warning, match=r"2 of 3 image\(s\) cannot be read") as record:
        ds = build_cache(pipe, samples, make_buckets(128, 64), cache, progress=False)
    assert len(sd35_warnings(record)) == 1
    assert [e.sample.image.name for e in ds.entries] == ["good.png"]
    assert sorted(p.name for p, _ in ds.skipped) == ["garbage.png", "truncated.png"]
    assert calls["vae"] == 1
    with pytest.warns(SD35Warning, match="cannot be read"):
        again = build_cache(pipe, samples, make_buckets(128, 64), cache, progress=False)
    assert calls["vae"] == 1 and sorted(p.name for p, _ in again.skipped) == ["garbage.png", "truncated.png"]


def test_cache_shared_across_ranks(counted, tmp_path):
    pipe, calls = counted
    samples = _dataset(tmp_path / "data")
    buckets = make_buckets(128, 64)
    cache = tmp_path / "cache"
    for rank in range(2):
        build_cache(pipe, samples, buckets, cache, t5_max_tokens=77, progress=False, rank=rank, world_size=2)
    assert calls == {"vae": 3, "text": 3}  # every entry encoded by exactly one rank
    ds = build_cache(pipe, samples, buckets, cache, t5_max_tokens=77, progress=False)
    assert calls == {"vae": 3, "text": 3} and len(ds) == 3


def test_pad_contexts_zero_pads():
    a, b = torch.ones(3, 4), torch.full((5, 4), 2.0)
    out = pad_contexts([a, b])
    assert out.shape == (2, 5, 4)
    assert (
        torch.equal(out[0, :3], a) and torch.equal(out[0, 3:], torch.zeros(2, 4)) and torch.equal(out[1], b)
    )
