"""Training data: finding image/caption pairs, aspect-ratio buckets, cropping, and the bucketed batch sampler.

A data set is either

- a folder of images (``.png .jpg .jpeg .webp .bmp``, searched recursively; hidden files and folders,
  whose names start with ``.``, are ignored), each with an optional caption in a ``.txt`` file of the same
  name next to it (``cat.png`` + ``cat.txt``); or
- a ``.jsonl`` file, one JSON object per line: ``{"image": "path", "caption": "..."}`` (``"text"`` is
  accepted for the caption and ``"file_name"`` for the image, as in Hugging Face ``metadata.jsonl``).
  Relative image paths are relative to the ``.jsonl`` file's folder.

Images train at one of a set of *buckets*, sizes of about the same area with different aspect ratios
(:func:`make_buckets`). Each image goes to the bucket of the closest aspect ratio (:func:`assign_bucket`),
is resized (Lanczos) to cover it and cropped to it: in the centre, or at a seeded random offset
(:func:`plan_crop`). The crop is recorded in a :class:`Crop`. Images that cannot be read are skipped and
reported (:func:`place_samples`), never an error in the middle of a run.

:class:`BucketBatchSampler` makes batches from one bucket at a time, the same for the same (seed, epoch),
split evenly across the processes of a distributed run, and resumable at the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sd35.errors import SD35Error, SD35Warning
from sd35.image_io import image_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
MAX_BUCKET_SIDE = 1440  # SD3.5 Medium was trained at sizes up to 1440 px
BUCKET_MULTIPLE = 16  # 8x VAE downsampling times the MMDiT-X patch size 2
_LISTED = 5  # names shown in a summarising warning


@dataclass(frozen=True)
class Sample:
    """One training example: an image file and its caption ("" when it has none)."""

    image: Path
    caption: str


# --------------------------------------------------------------------------------------------------
# Finding the data


def scan_dataset(source: str | os.PathLike) -> list[Sample]:
    """The samples of a folder of images (+ same-name ``.txt`` captions) or of a ``.jsonl`` file, sorted.

    Images without a caption get an empty one (one warning says how many). Caption files without an image
    of their name are named in a warning. Raises :class:`SD35Error` for a missing source, a data set
    without images, or a malformed ``.jsonl`` line (with its line number).
    """
    source = Path(source)
    if not source.exists():
        raise SD35Error(
            f"{source}: no such data set (a folder of images with .txt captions, or a .jsonl file)."
        )
    if source.is_dir():
        samples = _scan_folder(source)
    elif source.suffix.lower() == ".jsonl":
        samples = _scan_jsonl(source)
    else:
        raise SD35Error(
            f"{source}: a data set is a folder of images with .txt captions, or a .jsonl file "
            '(lines like {"image": "a.png", "caption": "..."}); this is neither.'
        )
    return sorted(samples, key=lambda s: (str(s.image), s.caption))


def _listing(paths: Sequence[object]) -> str:
    shown = ", ".join(str(p) for p in paths[:_LISTED])
    return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise SD35Error(f"{path}: the caption is not UTF-8 text; save it as UTF-8.") from None
    except OSError as e:
        raise SD35Error(f"{path}: cannot read the caption ({e.strerror or e}).") from None


def _scan_folder(folder: Path) -> list[Sample]:
    images: list[Path] = []
    captions: dict[Path, Path] = {}  # path without suffix -> caption file
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                images.append(path)
            elif suffix == CAPTION_SUFFIX:
                captions[path.with_suffix("")] = path
    stems = {p.with_suffix("") for p in images}
    orphans = sorted(str(p.relative_to(folder)) for s, p in captions.items() if s not in stems)
    if not images:
        if captions:
            raise SD35Error(
                f"{folder}: {len(captions)} caption file(s) but no images ({_listing(orphans)}). Images must be "
                f"{', '.join(IMAGE_SUFFIXES)} files next to their captions, with the same name."
            )
        raise SD35Error(
            f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, in sub-folders too)."
        )
    if orphans:
        warnings.warn(
            f"{folder}: {len(orphans)} caption file(s) without an image of the same name are ignored: "
            f"{_listing(orphans)}.",
            SD35Warning,
            stacklevel=3,
        )
    samples, uncaptioned = [], []
    for image in images:
        caption_file = captions.get(image.with_suffix(""))
        if caption_file is None:
            uncaptioned.append(str(image.relative_to(folder)))
        samples.append(Sample(image, _read_caption(caption_file) if caption_file else ""))
    _warn_uncaptioned(folder, uncaptioned, len(images), "a .txt file of the same name")
    return samples


def _warn_uncaptioned(source: Path, uncaptioned: list[str], total: int, where: str) -> None:
    if uncaptioned:
        warnings.warn(
            f"{source}: {len(uncaptioned)} of {total} image(s) have no caption ({where}) and train with an "
            f"empty caption: {_listing(sorted(uncaptioned))}.",
            SD35Warning,
            stacklevel=4,
        )


def _scan_jsonl(path: Path) -> list[Sample]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise SD35Error(f"{path}: not UTF-8 text; save the .jsonl file as UTF-8.") from None
    except OSError as e:
        raise SD35Error(f"{path}: cannot read it ({e.strerror or e}).") from None
    form = '{"image": "path/to/image.png", "caption": "..."}'
    samples, uncaptioned, missing = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SD35Error(
                f"{where}: not valid JSON ({e.msg}); each line must be one object like {form}."
            ) from None
        if not isinstance(record, dict):
            raise SD35Error(f"{where}: each line must be one JSON object like {form}.")
        image = record.get("image", record.get("file_name"))
        if not isinstance(image, str) or not image:
            raise SD35Error(f'{where}: no "image" path (a string); each line must be like {form}.')
        caption = record.get("caption", record.get("text"))
        if caption is None:
            caption = ""
            uncaptioned.append(image)
        elif not isinstance(caption, str):
            raise SD35Error(f'{where}: the "caption" must be a string, not {type(caption).__name__}.')
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            missing.append(f"{image} (line {number})")
        samples.append(Sample(image_path, caption.strip()))
    if missing:
        raise SD35Error(
            f"{path}: {len(missing)} image(s) do not exist: {_listing(missing)}. "
            f"Relative paths are relative to the folder of the .jsonl file ({path.parent})."
        )
    if not samples:
        raise SD35Error(f"{path}: no samples; each line must be one JSON object like {form}.")
    _warn_uncaptioned(path, uncaptioned, len(samples), 'a "caption" or "text" field')
    return samples


# --------------------------------------------------------------------------------------------------
# Buckets


def make_buckets(
    max_side: int = 1024,
    min_side: int = 256,
    step: int = 64,
    max_area: int | None = None,
    max_aspect: float = 4.0,
) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)``, sorted by aspect ratio (tall first).

    Every side is a multiple of ``step`` (so latents are whole and patchable), at least ``min_side``; every
    area is at most ``max_area`` (default ``max_side**2``); the long side is at most ``max_aspect`` times the
    short one. For each short side the long side is the largest that fits the area, in both orientations;
    the square ``max_side x max_side`` is always a bucket, even when ``max_side`` is only a multiple of 16
    (1440 = 22.5 x 64 is, so ``max_side=1440`` can train 1440x1440). ``max_side`` may be up to 1440, the
    largest size SD3.5 Medium was trained at.
    """
    if step < BUCKET_MULTIPLE or step % BUCKET_MULTIPLE:
        raise SD35Error(f"the bucket step must be a multiple of {BUCKET_MULTIPLE}, got {step}.")
    if max_side % BUCKET_MULTIPLE or not step <= max_side <= MAX_BUCKET_SIDE:
        raise SD35Error(
            f"the largest bucket side must be a multiple of {BUCKET_MULTIPLE} between {step} and "
            f"{MAX_BUCKET_SIDE} (SD3.5 Medium's largest training size), got {max_side}."
        )
    if not step <= min_side <= max_side:
        raise SD35Error(f"the smallest bucket side must be between {step} and {max_side}, got {min_side}.")
    area = max_side * max_side if max_area is None else max_area
    if area < min_side * min_side:
        raise SD35Error(f"max_area {area} is below the smallest bucket ({min_side}x{min_side}).")
    if max_aspect < 1.0:
        raise SD35Error(f"max_aspect must be at least 1, got {max_aspect}.")
    short = -(-min_side // step) * step
    buckets = {(max_side, max_side)} if max_side * max_side <= area else set()
    while short * short <= area:
        long = area // short // step * step
        if long / short <= max_aspect:
            buckets.update({(long, short), (short, long)})
        short += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width/height`` (in log ratio); ties go to the larger area."""
    if not buckets:
        raise SD35Error("no buckets to choose from.")
    if width <= 0 or height <= 0:
        raise SD35Error(f"an image of {width}x{height} has no aspect ratio.")
    ratio = math.log(width / height)

    def distance(b: tuple[int, int]) -> tuple[float, int]:
        return round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]

    return min(buckets, key=distance)


# --------------------------------------------------------------------------------------------------
# Images: reading, sizing, cropping


@dataclass(frozen=True)
class Crop:
    """How an image becomes its bucket: resized from ``original`` to ``resized`` (covering ``bucket``), then the
    ``bucket``-sized window at (``left``, ``top``) is cut out. Sizes are (width, height), after EXIF rotation."""

    original: tuple[int, int]
    resized: tuple[int, int]
    bucket: tuple[int, int]
    left: int
    top: int


def crop_rng(seed: int, image: str | os.PathLike) -> random.Random:
    """The random crop generator of one image: a function of the seed and the path alone, so adding or removing
    other images changes no crop (and invalidates no cached latent)."""
    digest = hashlib.sha256(f"{seed}\0{Path(image)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def plan_crop(
    width: int,
    height: int,
    bucket: tuple[int, int],
    random_crop: bool = False,
    rng: random.Random | None = None,
) -> Crop:
    """Resize ``width x height`` to just cover ``bucket`` (aspect kept), and place the crop window:
    centred, or at a uniformly random offset from ``rng`` with ``random_crop``."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if random_crop:
        rng = rng or random.Random(0)
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return Crop((width, height), (rw, rh), (bw, bh), left, top)


def apply_crop(image: Image.Image, crop: Crop) -> Image.Image:
    """The bucket-sized RGB image that ``crop`` describes."""
    if image.size != crop.original:
        raise SD35Error(
            f"the image is {image.width}x{image.height} but its crop was planned for "
            f"{crop.original[0]}x{crop.original[1]}; it changed on disk."
        )
    if image.size != crop.resized:
        image = image.resize(crop.resized, Image.LANCZOS)
    bw, bh = crop.bucket
    return image.crop((crop.left, crop.top, crop.left + bw, crop.top + bh))


def place_samples(
    samples: Sequence[Sample],
    buckets: Sequence[tuple[int, int]],
    random_crop: bool = False,
    seed: int = 0,
    warn: bool = True,
) -> tuple[list[tuple[int, Crop]], list[tuple[Path, str]]]:
    """``(sample index, crop)`` of every readable sample, and ``(path, reason)`` of every one skipped.

    Only image headers are read here; an image whose pixels turn out broken is caught when it is encoded.
    """
    placed, skipped = [], []
    for i, sample in enumerate(samples):
        try:
            width, height = image_size(sample.image)
        except SD35Error as e:
            skipped.append((sample.image, _strip_path(str(e), sample.image)))
            continue
        bucket = assign_bucket(width, height, buckets)
        rng = crop_rng(seed, sample.image) if random_crop else None
        placed.append((i, plan_crop(width, height, bucket, random_crop, rng)))
    if warn:
        warn_skipped(skipped, len(samples))
    return placed, skipped


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def warn_skipped(skipped: Sequence[tuple[Path, str]], total: int) -> None:
    """One warning naming the skipped images (the first few) and why."""
    if skipped:
        listed = "; ".join(f"{p} ({why})" for p, why in skipped[:_LISTED])
        more = f"; and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""
        warnings.warn(
            f"{len(skipped)} of {total} image(s) cannot be read and are skipped: {listed}{more}.",
            SD35Warning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------
# Batches


class BucketBatchSampler:
    """Batches of sample indices, each from a single bucket, for ``DataLoader(batch_sampler=...)``.

    ``bucket_of[i]`` is sample i's bucket (any hashable). An epoch's batches are a function of (seed, epoch):
    each bucket's samples are shuffled and cut into batches of ``batch_size`` (the last one smaller, or
    dropped with ``drop_last``), and the batches of all buckets are shuffled together. With ``world_size``
    processes, rank r takes batches r, r + world_size, ...; every rank gets :func:`len` batches: surplus
    batches are dropped with ``drop_last``, otherwise the list is padded by repeating batches from its start
    (so every sample is seen each epoch, a few twice).

    Iterating yields the current epoch's batches from the current position; when an epoch runs out the
    sampler moves on to the next one by itself. :meth:`set_epoch` with another epoch starts that epoch at
    its beginning; with the current one it changes nothing, so a resumed run may call it freely.
    :meth:`state_dict` counts a batch as done as soon as it has been yielded: right for a loop over the
    sampler or a ``DataLoader`` with ``num_workers=0``; with workers, which fetch batches ahead, set
    ``state["position"]`` to the number of batches the loop consumed this epoch before saving.
    """

    def __init__(
        self,
        bucket_of: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise SD35Error(f"the batch size must be at least 1, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SD35Error(f"rank {rank} of world size {world_size} is not a process of the run.")
        if not bucket_of:
            raise SD35Error("no samples to make batches of.")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, int(seed), shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        groups: dict[Hashable, list[int]] = {}
        for i, b in enumerate(bucket_of):
            groups.setdefault(b, []).append(i)
        self._groups = list(groups.values())  # in order of first appearance: deterministic
        per_bucket = [len(g) // batch_size if drop_last else -(-len(g) // batch_size) for g in self._groups]
        total = sum(per_bucket)
        self._per_rank = total // world_size if drop_last else -(-total // world_size)
        if self._per_rank == 0:
            raise SD35Error(
                f"{len(bucket_of)} sample(s) in {len(self._groups)} bucket(s) make {total} full batch(es) of "
                f"{batch_size}, too few for {world_size} process(es); lower the batch size or keep partial batches."
            )
        layout = json.dumps([batch_size, shuffle, drop_last, world_size, [repr(b) for b in bucket_of]])
        self._layout = hashlib.sha256(layout.encode()).hexdigest()[:16]
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._per_rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed % 2**64, epoch % 2**64])
        batches: list[list[int]] = []
        for group in self._groups:
            order = [group[j] for j in rng.permutation(len(group))] if self.shuffle else group
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        needed = self._per_rank * self.world_size
        while len(batches) < needed:
            batches += batches[: needed - len(batches)]
        return batches[:needed][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "layout": self._layout}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was saved. A changed data set, batch size or world size cannot continue the
        same batches: a warning says so and the epoch goes on from the same batch count."""
        if state.get("layout") != self._layout:
            warnings.warn(
                "the data set, batch size or number of processes changed since this run was saved, so the "
                "resumed epoch's batches differ from the ones the run would have seen.",
                SD35Warning,
                stacklevel=2,
            )
        if "seed" in state and int(state["seed"]) != self.seed:
            warnings.warn(
                f"the run was saved with data seed {state['seed']}; it goes on with that seed, not {self.seed}.",
                SD35Warning,
                stacklevel=2,
            )
            self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), self._per_rank)
