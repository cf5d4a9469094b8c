"""Latents and text embeddings, computed once with the frozen VAE and text encoders and cached on disk.

Layout under the cache folder, one safetensors file each, written atomically (temp file, then rename):

- ``latents/<key>.safetensors``: ``latent`` [16, h/8, w/8] float32 in model space (after
  :func:`~sd35.models.vae.latent_to_model`; the VAE posterior mean, as ``SD3Pipeline.encode_image``). The key
  hashes the image's absolute path, modification time and byte size, its bucket and crop, and the VAE's
  fingerprint, so a changed image, bucket set, crop or VAE gets a new entry. An image that cannot be
  decoded leaves ``latents/<key>.skip`` (the reason) so it is reported, not retried, until it changes.
- ``text/<key>.safetensors``: ``context`` [L, D] and ``pooled`` [P]. The key hashes the caption,
  ``t5_max_tokens`` and the text encoders' fingerprint; equal captions share one file. The empty caption
  (for caption dropout) is always cached: :attr:`CachedDataset.empty_text`. Stored in bfloat16 when that is
  lossless (encoders run in bf16 on GPUs), else float32; always read back as float32.

Stale files are never deleted; remove the folder to reclaim the space.

**Context lengths.** Each caption is encoded on its own, exactly as ``SD3Pipeline.encode_prompt([caption],
t5_max_tokens)`` does, so its T5 part is ``min(max(77, tokens), t5_max_tokens)`` long: what the pipeline feeds
the MMDiT-X at inference for that prompt. Captions of a batch can thus differ in length; :func:`collate` pads
them with zero rows to the longest in the batch. The MMDiT-X has no attention mask, so zero rows are not
quite "nothing" (they still take part in the joint attention) and change the result slightly. With
``t5_max_tokens=77`` (the trainer's default ``caption_t5_tokens``) every context is exactly 154 rows and no
padding ever happens; longer limits only pad batches that mix captions of over 76 T5 tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from sd35.conditioning.tokenize import T5_MAX_TOKENS
from sd35.errors import CheckpointError, SD35Error, SD35Warning
from sd35.files import write_atomic
from sd35.image_io import read_image
from sd35.imaging import image_to_tensor
from sd35.loading.safetensors_io import read_header, save_file_atomic
from sd35.models.vae import latent_to_model
from sd35.request import TextOptions
from sd35.train.data import Crop, Sample, apply_crop, place_samples, warn_skipped

CACHE_VERSION = 1
LATENT_DIR, TEXT_DIR = "latents", "text"
_LISTED = 5


def model_fingerprint(module: torch.nn.Module | None) -> str:
    """A short hash of a module's class, parameter names, shapes and dtypes and a strided sample of its values.

    Cheap even for T5-XXL (64 values per tensor), and different for other weights or another dtype.
    """
    h = hashlib.sha256(type(module).__name__.encode())
    if module is not None:
        for name, t in module.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 64), device=flat.device).long()
                h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _key(**fields: object) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **fields}, sort_keys=True).encode()).hexdigest()[
        :32
    ]


def latent_key(image: Path, crop: Crop, model_id: str) -> str:
    """The cache key of an image's latent (see the module docstring)."""
    st = image.stat()
    return _key(
        image=str(image.resolve()),
        mtime_ns=st.st_mtime_ns,
        size=st.st_size,
        original=crop.original,
        resized=crop.resized,
        bucket=crop.bucket,
        crop=(crop.left, crop.top),
        model=model_id,
    )


def text_key(caption: str, t5_max_tokens: int, model_id: str) -> str:
    """The cache key of a caption's embeddings (see the module docstring)."""
    return _key(caption=caption, t5_max_tokens=t5_max_tokens, model=model_id)


def _compact(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().float().cpu().contiguous()
    b = t.to(torch.bfloat16)
    return b if torch.equal(b.float(), t) else t


def _valid(path: Path, keys: tuple[str, ...], shape: tuple[int, ...] | None = None) -> bool:
    try:
        header = read_header(path) if path.is_file() else None
    except CheckpointError:
        return False
    if header is None or any(k not in header for k in keys):
        return False
    return shape is None or tuple(header[keys[0]]["shape"]) == shape


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SD35Error(
            f"{path}: not in the cache. Build it with build_cache (in a multi-process run, every rank must "
            "finish its share before any reads)."
        )
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own error types
        raise SD35Error(
            f"{path}: the cache file cannot be read ({e}); delete it and build the cache again."
        ) from None


@dataclass(frozen=True)
class CacheEntry:
    """One cached training example."""

    sample: Sample
    crop: Crop
    latent_file: Path
    text_file: Path


class CachedDataset(torch.utils.data.Dataset):
    """Training examples read from the cache: ``dataset[i]`` is a dict of

    - ``latent``: [16, h, w] float32, model space; ``context``: [L, D] and ``pooled``: [P] float32;
    - ``bucket``: (width, height); ``index``: i; ``caption``: the caption text.

    ``bucket_of`` (each example's index in ``buckets``) feeds :class:`~sd35.train.data.BucketBatchSampler`;
    ``skipped`` lists the ``(image, reason)`` of the samples left out; ``empty_text`` is the empty caption's
    ``context`` and ``pooled``, for caption dropout.
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        buckets: Sequence[tuple[int, int]],
        empty_file: Path,
        skipped: Sequence[tuple[Path, str]] = (),
    ):
        self.entries = list(entries)
        self.buckets = [tuple(b) for b in buckets]
        self.bucket_of = [self.buckets.index(e.crop.bucket) for e in self.entries]
        self.empty_file = empty_file
        self.skipped = list(skipped)
        self._empty: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        text = _load(e.text_file)
        return {
            "latent": _load(e.latent_file)["latent"],
            "context": text["context"],
            "pooled": text["pooled"],
            "bucket": e.crop.bucket,
            "index": i,
            "caption": e.sample.caption,
        }

    @property
    def empty_text(self) -> dict[str, torch.Tensor]:
        """``{"context": [L, D], "pooled": [P]}`` of the empty caption (the unconditional input)."""
        if self._empty is None:
            self._empty = _load(self.empty_file)
        return self._empty


def pad_contexts(contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, L_max, D]: the [L_i, D] contexts with zero rows appended to the longest (see the module docstring)."""
    longest = max(c.shape[0] for c in contexts)
    out = contexts[0].new_zeros((len(contexts), longest, contexts[0].shape[1]))
    for row, c in zip(out, contexts, strict=True):
        row[: c.shape[0]] = c
    return out


def collate(items: Sequence[dict]) -> dict:
    """A batch from :class:`CachedDataset` items of one bucket: ``latent`` [B, 16, h, w], ``context``
    [B, L_max, D] (zero-padded), ``pooled`` [B, P], ``bucket``, ``index`` [B] and ``caption`` (a list).

    For caption dropout, replace an item's ``context``/``pooled`` by ``dataset.empty_text``'s before collating.
    """
    buckets = {tuple(it["bucket"]) for it in items}
    if len(buckets) != 1:
        raise SD35Error(
            f"a batch mixes buckets {sorted(buckets)}; batch with BucketBatchSampler so each batch has one size."
        )
    return {
        "latent": torch.stack([it["latent"] for it in items]),
        "context": pad_contexts([it["context"] for it in items]),
        "pooled": torch.stack([it["pooled"] for it in items]),
        "bucket": buckets.pop(),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "caption": [it["caption"] for it in items],
    }


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_cache(
    pipe,
    samples: Sequence[Sample],
    buckets: Sequence[tuple[int, int]],
    cache_dir: str | os.PathLike,
    t5_max_tokens: int = T5_MAX_TOKENS,
    batch_size: int = 1,
    progress: bool = True,
    *,
    random_crop: bool = False,
    seed: int = 0,
    model_id: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> CachedDataset:
    """Encode what the cache lacks and return the cached data set.

    ``pipe`` is a loaded :class:`~sd35.pipeline.SD3Pipeline` (its VAE and text encoders are used, frozen).
    Images go to the closest of ``buckets``, centre-cropped (or randomly, seeded per image by ``seed`` and its
    path, with ``random_crop``). ``batch_size`` images of one bucket are VAE-encoded together, and captions
    of the same T5 length are text-encoded together. Unreadable images are skipped (one warning; the list is
    ``dataset.skipped``). ``model_id`` replaces the weights' fingerprints in the keys.

    In a multi-process run, call it on every rank with ``rank``/``world_size``: each rank encodes its share
    of what is missing. Then wait for all (a barrier) and call it again without them; that call finds
    everything cached and returns the same data set on every rank.
    """
    cache_dir = Path(cache_dir)
    if batch_size < 1:
        raise SD35Error(f"the caching batch size must be at least 1, got {batch_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise SD35Error(f"rank {rank} of world size {world_size} is not a process of the run.")
    (cache_dir / LATENT_DIR).mkdir(parents=True, exist_ok=True)
    (cache_dir / TEXT_DIR).mkdir(parents=True, exist_ok=True)
    vae_id = model_id or f"vae-{model_fingerprint(pipe.vae)}"
    text_id = model_id or f"text-{model_fingerprint(pipe.text)}"

    placed, skipped = place_samples(samples, buckets, random_crop, seed, warn=False)
    planned: list[tuple[Sample, Crop, Path]] = []
    for i, crop in placed:
        image = samples[i].image
        planned.append(
            (samples[i], crop, cache_dir / LATENT_DIR / f"{latent_key(image, crop, vae_id)}.safetensors")
        )

    def text_file(caption: str) -> Path:
        return cache_dir / TEXT_DIR / f"{text_key(caption, t5_max_tokens, text_id)}.safetensors"

    def mine(file: Path) -> bool:  # a fixed share per rank, whatever the others have written already
        return int(file.stem, 16) % world_size == rank

    # latents: this rank's share of what is neither cached nor known to be broken
    f = pipe.vae.config.downscale
    todo = [
        (sample, crop, file)
        for sample, crop, file in planned
        if mine(file)
        and not file.with_suffix(".skip").is_file()
        and not _valid(
            file, ("latent",), (pipe.vae.config.z_channels, crop.bucket[1] // f, crop.bucket[0] // f)
        )
    ]
    todo = list({t[2]: t for t in todo}.values())  # the same image twice (two captions) is encoded once
    captions = sorted({s.caption for s, _, _ in planned} | {""})
    text_todo = [
        c for c in captions if mine(text_file(c)) and not _valid(text_file(c), ("context", "pooled"))
    ]

    bar = _progress(progress, len(todo) + len(text_todo))
    try:
        with torch.no_grad():
            _encode_latents(pipe, todo, batch_size, bar)
            _encode_texts(pipe, text_todo, text_file, t5_max_tokens, batch_size, bar)
    finally:
        if bar is not None:
            bar.close()

    entries = []
    for sample, crop, file in planned:
        marker = file.with_suffix(".skip")
        if marker.is_file():
            skipped.append((sample.image, marker.read_text(encoding="utf-8").strip()))
        else:
            entries.append(CacheEntry(sample, crop, file, text_file(sample.caption)))
    skipped.sort(key=lambda s: str(s[0]))
    warn_skipped(skipped, len(samples))
    if not entries:
        raise SD35Error(f"none of the {len(samples)} image(s) can be read; there is nothing to train on.")
    return CachedDataset(entries, buckets, text_file(""), skipped)


def _progress(enabled: bool, total: int):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="item", desc="caching latents and text", dynamic_ncols=True)


def _encode_latents(pipe, todo: list[tuple[Sample, Crop, Path]], batch_size: int, bar) -> None:
    by_bucket: dict[tuple[int, int], list[tuple[Sample, Crop, Path]]] = {}
    for item in todo:
        by_bucket.setdefault(item[1].bucket, []).append(item)
    for (bw, bh), items in sorted(by_bucket.items()):
        for chunk in _chunks(items, batch_size):
            pixels, files = [], []
            for sample, crop, file in chunk:
                try:
                    pixels.append(image_to_tensor(apply_crop(read_image(sample.image), crop), bw, bh))
                    files.append(file)
                except SD35Error as e:
                    reason = str(e).removeprefix(f"{sample.image}: ") + "\n"
                    write_atomic(
                        file.with_suffix(".skip"), lambda tmp, r=reason: tmp.write_text(r), "replace"
                    )
            if pixels:
                batch = torch.cat(pixels).to(pipe.device)
                latents = latent_to_model(pipe.vae.encode(batch).float())
                for latent, file in zip(latents, files, strict=True):
                    save_file_atomic({"latent": latent.cpu()}, file, {"bucket": f"{bw}x{bh}"})
            if bar is not None:
                bar.update(len(chunk))


def _encode_texts(
    pipe, captions: list[str], text_file: Callable[[str], Path], t5_max_tokens: int, batch_size: int, bar
) -> None:
    if not captions:
        return
    groups: dict[int, list[str]] = {}
    for caption in captions:
        t5 = pipe.tokenizer([caption], t5_max_tokens=t5_max_tokens).t5 if batch_size > 1 else None
        groups.setdefault(0 if t5 is None else t5.shape[1], []).append(caption)
    long_t5, long_clip = [], []
    for group in groups.values():
        for chunk in _chunks(group, batch_size):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                context, pooled = pipe.encode_prompt(chunk, TextOptions(t5_max_tokens=t5_max_tokens))
            for w in caught:
                text = str(w.message)
                if "T5 dropped" in text:
                    long_t5.append(text)
                elif "CLIP reads only" in text:
                    long_clip.append(text)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            for caption, c, p in zip(chunk, context, pooled, strict=True):
                save_file_atomic({"context": _compact(c), "pooled": _compact(p)}, text_file(caption))
            if bar is not None:
                bar.update(len(chunk))
    if long_t5:
        warnings.warn(
            f"{len(long_t5)} caption(s) are longer than t5_max_tokens {t5_max_tokens}: T5 sees only their start. "
            "Raise the T5 token limit or shorten them.",
            SD35Warning,
            stacklevel=3,
        )
    if long_clip:
        warnings.warn(
            f"{len(long_clip)} caption(s) are longer than CLIP's 75 tokens: CLIP sees only their start "
            "(T5 reads further).",
            SD35Warning,
            stacklevel=3,
        )
