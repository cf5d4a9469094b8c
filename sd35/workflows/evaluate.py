"""What each node means: a checked workflow evaluated into one request per sampler node.

Values are descriptions, not tensors: a MODEL is the file it comes from plus what later nodes set on it
(the flow shift, Skip Layer Guidance, LoRAs), a CONDITIONING the texts and timestep ranges it is made of,
a LATENT its size (an empty one) or the nodes that make it, an IMAGE the sampler node and VAE that make it
or the file and scaling it comes from (:class:`sd35.workflows.execute.Executor` turns these into tensors). KSampler turns
them into one :class:`~sd35.request.GenerateRequest` with ComfyUI's meaning (ComfyUI's sampler and
scheduler names, ``noise="comfyui"``, ``batch_noise="batch"``, ``(word:1.2)`` emphasis as ComfyUI weighs
it, SLG by sigma), so the image is the one ``sd35 generate`` makes with those options: one sampling path.
A KSampler over a latent that other nodes made (an encoded image, a noise mask, an earlier sampler's
output) also carries a :class:`Start`, which the pipeline samples from as ComfyUI does
(:class:`~sd35.pipeline.LatentStart`: its denoise schedule, step window and noise-mask blending). What a
request cannot say (a positive prompt with a timestep range, two different prompts in CLIPTextEncodeSD3,
a LoRA with different model and CLIP strengths) is an Unsupported error naming the node and input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from sd35.control.files import check_fits, read_controlnet
from sd35.control.unit import ControlUnit
from sd35.errors import InvalidRequest, SD35Error, Unsupported, WorkflowError
from sd35.loading.components import CLIP_G, CLIP_L, MMDITX, scan
from sd35.lora.summary import summarize_lora
from sd35.models.mmditx import MMDiTXConfig
from sd35.models.vae_tiling import Tiling
from sd35.pipeline import ASPECT_SLACK
from sd35.request import SIZE_MULTIPLE, GenerateRequest, LoraRef, TextOptions
from sd35.sampling.guidance import SkipLayerGuidance
from sd35.workflows.graph import Checked, declared_inputs, error_entry, is_link
from sd35.workflows.pixels import DOWNSCALE, EMPTY_MASK, alpha_mask, scale_size
from sd35.workflows.pixels import image_size as read_image_size


@dataclass(frozen=True)
class ModelValue:
    """A MODEL: its file (``checkpoint``: loaded by CheckpointLoaderSimple, so it may carry the VAE and
    text encoders too) and the settings nodes after the loader put on it."""

    file: Path
    checkpoint: bool
    shift: float | None = None
    slg: SkipLayerGuidance | None = None
    loras: tuple[LoraRef, ...] = ()


@dataclass(frozen=True)
class ClipValue:
    """A CLIP: the text-encoder files (empty: those of ``checkpoint``) and the LoRAs applied to them."""

    files: tuple[Path, ...] = ()
    checkpoint: Path | None = None
    loras: tuple[LoraRef, ...] = ()


@dataclass(frozen=True)
class VaeValue:
    file: Path
    checkpoint: bool


@dataclass(frozen=True)
class CondPart:
    """One entry of a CONDITIONING: a text encoded by ``clip`` (``zero``: ConditioningZeroOut of it),
    active from ``start`` to ``end`` of the model's time; ``node`` made the encoding."""

    text: str
    clip: ClipValue
    node: str
    zero: bool = False
    start: float = 0.0
    end: float = 1.0
    controls: tuple[ControlSpec, ...] = ()


@dataclass(frozen=True)
class LatentValue:
    width: int
    height: int
    batch: int


@dataclass(frozen=True)
class ControlNetValue:
    """A CONTROL_NET: its file."""

    file: Path


@dataclass(frozen=True)
class ControlSpec:
    """A ControlNetApplyAdvanced on a conditioning: a :class:`~sd35.control.unit.ControlUnit` with
    ComfyUI's percent window, less its image, which is the IMAGE value ``image`` (made at run time);
    ``vae``: the VAE ComfyUI encodes the image with."""

    net: Path
    image: Any
    strength: float
    start: float
    end: float
    vae: VaeValue

    def unit(self, image: Image.Image) -> ControlUnit:
        """The request's unit with the image made: fitted to the size centre-cropped, as ComfyUI's
        ``common_upscale(..., "center")`` does (it samples nearest-exact, we Lanczos: equal when the image
        has the generation's size, as a sampler's image of the same latent does)."""
        return ControlUnit(
            model=str(self.net),
            image=image,
            strength=self.strength,
            start=self.start,
            end=self.end,
            window="percent",
            resize_mode="crop_and_resize",
        )


@dataclass(frozen=True)
class LoadSpec:
    """The files :func:`sd35.load_pipeline` loads: the model, text encoders (None: the model's) and VAE
    (None: the model's)."""

    model: Path
    text_encoders: tuple[Path, ...] | None = None
    vae: Path | None = None


@dataclass(frozen=True)
class Sampling:
    """One KSampler: what to load, the request to run, over a latent other nodes made where it starts
    (``start``), and its ControlNets (``controls``), whose images the
    :class:`~sd35.workflows.execute.Executor` makes first and puts into ``request.controls``."""

    node: str
    load: LoadSpec
    request: GenerateRequest
    start: Start | None = None
    controls: tuple[ControlSpec, ...] = ()


@dataclass(frozen=True)
class ImageValue:
    """An IMAGE: the images of a sampling, decoded by ``vae`` (in tiles: ``tiling``)."""

    sampling: Sampling
    vae: VaeValue
    tiling: Tiling | None = None


@dataclass
class Output:
    """A SaveImage (``prefix``) or PreviewImage (``prefix`` None) node and the images it shows (an
    :class:`ImageValue`, or a :class:`LoadedImage` or :class:`ScaledImage`)."""

    node: str
    image: Any
    prefix: str | None


@dataclass
class Plan:
    """A checked workflow's work: the samplings to run and the output nodes that show their images."""

    outputs: list[Output] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def samplings(value: Any) -> list[Sampling]:
    """Every sampler node a value needs, each once, those it reads first (a latent it starts from, its
    ControlNets' images) before it: what a server checks against its limits before queueing."""
    found: dict[str, Sampling] = {}

    def visit(v: Any) -> None:
        if isinstance(v, Sampling):
            visit(v.start)
            visit(v.controls)
            found.setdefault(v.node, v)
        elif isinstance(v, (tuple, list)):
            for item in v:
                visit(item)
        elif is_dataclass(v) and not isinstance(v, type):
            for f in fields(v):
                visit(getattr(v, f.name))

    visit(value)
    return list(found.values())


class _Fail(Exception):
    """An input that the request cannot express (turned into a WorkflowError naming the node)."""

    def __init__(self, name: str | None, message: str, kind: type[SD35Error] = Unsupported):
        super().__init__(message)
        self.name, self.message, self.kind = name, message, kind


Handler = Callable[[str, dict[str, Any], Checked], tuple[Any, ...]]


def _loras(model: tuple[LoraRef, ...], ref: LoraRef) -> tuple[LoraRef, ...]:
    if any(r.name == ref.name for r in model):
        raise _Fail("lora_name", f"the LoRA {ref.name} is applied twice; apply it once")
    return (*model, ref)


def _checkpoint(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    path = c.files[(node, "ckpt_name")]
    return ModelValue(path, True), ClipValue(checkpoint=path), VaeValue(path, True)


def _unet(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    if i["weight_dtype"] != "default":
        raise _Fail(
            "weight_dtype",
            f"weight_dtype {i['weight_dtype']!r} is not supported here; use 'default' (sd35 picks the dtype "
            "for the device; `sd35 convert` makes fp8 files)",
        )
    return (ModelValue(c.files[(node, "unet_name")], False),)


def _triple_clip(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (ClipValue(files=tuple(c.files[(node, f"clip_name{k}")] for k in (1, 2, 3))),)


def _vae(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (VaeValue(c.files[(node, "vae_name")], False),)


def _lora(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    model, clip = i["model"], i["clip"]
    if i["strength_model"] != i["strength_clip"]:
        raise _Fail(
            "strength_clip",
            f"strength_model {i['strength_model']} and strength_clip {i['strength_clip']} differ; sd35 applies "
            "a LoRA with one strength to the model and text encoders: set them equal",
        )
    ref = LoraRef(str(c.files[(node, "lora_name")]), float(i["strength_model"]))
    return replace(model, loras=_loras(model.loras, ref)), replace(clip, loras=_loras(clip.loras, ref))


def _lora_model_only(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    model, path = i["model"], c.files[(node, "lora_name")]
    text = sorted(set(summarize_lora(path).components) - {"mmditx"})
    if text:  # sd35 applies a LoRA file whole: faithful only when it has nothing for the text encoders
        raise _Fail(
            "lora_name",
            f"{path.name} also changes the text encoders ({', '.join(text)}), which this node leaves alone; "
            "use LoraLoader with equal strengths",
        )
    ref = LoraRef(str(path), float(i["strength_model"]))
    return (replace(model, loras=_loras(model.loras, ref)),)


def _text(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return ((CondPart(i["text"], i["clip"], node),),)


def _text_sd3(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    if not i["clip_l"] == i["clip_g"] == i["t5xxl"]:
        raise _Fail(
            "t5xxl", "clip_l, clip_g and t5xxl differ; sd35 encodes one prompt: give all three the same text"
        )
    if i["empty_padding"] != "none" and not i["clip_l"]:
        raise _Fail(
            "empty_padding", "empty_padding 'empty_prompt' with an empty prompt is not supported; use 'none'"
        )
    return ((CondPart(i["clip_l"], i["clip"], node),),)


def _zero_out(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (tuple(replace(p, zero=True) for p in i["conditioning"]),)


def _timestep_range(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (tuple(replace(p, start=float(i["start"]), end=float(i["end"])) for p in i["conditioning"]),)


def _combine(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (i["conditioning_1"] + i["conditioning_2"],)


def _model_sampling(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    if not i["shift"] > 0:
        raise _Fail("shift", f"shift must be above 0, got {i['shift']}", InvalidRequest)
    return (replace(i["model"], shift=float(i["shift"])),)


def _slg(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    try:
        layers = tuple(int(x) for x in i["layers"].split(",") if x.strip())
    except ValueError:
        raise _Fail(
            "layers", f"layers must be block numbers like '7, 8, 9', got {i['layers']!r}", InvalidRequest
        ) from None
    if not layers or i["scale"] == 0 or i["start_percent"] >= i["end_percent"]:
        return (i["model"],)  # ComfyUI's node then never skips a layer
    slg = SkipLayerGuidance(
        layers, float(i["scale"]), float(i["start_percent"]), float(i["end_percent"]), window="sigma"
    )
    return (replace(i["model"], slg=slg),)


def _empty_latent(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (LatentValue(int(i["width"]), int(i["height"]), int(i["batch_size"])),)


def _load_spec(model: ModelValue, clip: ClipValue) -> LoadSpec:
    if clip.files:
        text_encoders: tuple[Path, ...] | None = clip.files
    elif clip.checkpoint == model.file:
        text_encoders = None
    else:
        raise _Fail(
            "positive",
            "the text encoders come from another checkpoint than the model; load them with TripleCLIPLoader",
        )
    return LoadSpec(model.file, text_encoders)


def _prompt(parts: tuple[CondPart, ...], name: str) -> CondPart:
    """The positive: one text, active all the time."""
    if len(parts) != 1 or parts[0].zero or (parts[0].start, parts[0].end) != (0.0, 1.0):
        raise _Fail(name, "the positive must be one text encoding, without a timestep range or zeroing")
    return parts[0]


def _negative(parts: tuple[CondPart, ...], name: str) -> tuple[CondPart, float | None]:
    """The negative text and ``negative_until`` (see :class:`~sd35.sampling.guidance.GuidedDenoiser`):
    a text (None), its ConditioningZeroOut (0), or ComfyUI's SD3 example, the text over [0, p] combined
    with its zeroing over [p, 1] (p)."""
    full = [p for p in parts if (p.start, p.end) == (0.0, 1.0)]
    if len(parts) == 1 and full:
        return parts[0], 0.0 if parts[0].zero else None
    if len(parts) == 2:
        text = next((p for p in parts if not p.zero), None)
        zero = next((p for p in parts if p.zero), None)
        if (
            text is not None
            and zero is not None
            and (text.text, text.clip) == (zero.text, zero.clip)
            and text.start == 0.0
            and zero.end == 1.0
            and text.end == zero.start
        ):
            return text, text.end
    raise _Fail(
        name,
        "this negative is not supported: sd35 runs a negative text, its ConditioningZeroOut, or the text over "
        "[0, p] combined with its ConditioningZeroOut over [p, 1] (ComfyUI's SD3 example)",
    )


def _sampling(node: str, i: dict[str, Any], seed: int, start: Start | None = None) -> tuple[Any, ...]:
    """One sampling: full txt2img from an empty latent (``start`` None), else from ``start``'s latent."""
    model = i["model"]
    latent = LatentValue(*latent_size(i["latent_image"]))
    if start is not None and (latent.width % SIZE_MULTIPLE or latent.height % SIZE_MULTIPLE):
        raise _Fail(
            "latent_image",
            f"the latent is {latent.width}x{latent.height} px; sd35 samples sizes that are multiples of "
            f"{SIZE_MULTIPLE}: scale the image first (ImageScale)",
        )
    positive = _prompt(i["positive"], "positive")
    negative, until = _negative(i["negative"], "negative")
    if negative.clip != positive.clip:
        raise _Fail(
            "negative", "the positive and negative are encoded by different text encoders; use one CLIP"
        )
    if any(r not in model.loras for r in positive.clip.loras):
        raise _Fail("positive", "a LoRA changes the text encoders but not this model; apply LoRAs to both")
    controls = _controls(i["positive"], i["negative"], model)
    try:
        request = GenerateRequest(
            prompt=positive.text,
            negative_prompt=negative.text,
            width=latent.width,
            height=latent.height,
            steps=int(i["steps"]),
            cfg=float(i["cfg"]),
            sampler=i["sampler_name"],
            scheduler=i["scheduler"],
            shift=model.shift,
            seed=seed,
            num_images=latent.batch,
            noise="comfyui",
            batch_noise="batch",
            negative_until=until,
            slg=model.slg,
            loras=model.loras,
            text=TextOptions(weighting="comfy"),
        )
    except SD35Error as e:
        raise _Fail(e.param, e.message, type(e)) from None
    load = _load_spec(model, positive.clip)
    if start is not None:
        for vae in encoders(start.latent):
            with_vae(load, vae, "latent_image")
    if controls:
        load = with_vae(load, controls[0].vae, "positive")
    return (Sampling(node, load, request, start, controls),)


def _ksampler(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """KSampler: over an empty latent at denoise 1, the plain txt2img request; else from the latent, with
    ComfyUI's denoise schedule."""
    latent, denoise = i["latent_image"], float(i["denoise"])
    if isinstance(latent, LatentValue) and denoise == 1.0:
        return _sampling(node, i, int(i["seed"]))
    return _sampling(node, i, int(i["seed"]), Start(latent, denoise=denoise))


def _ksampler_advanced(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """KSamplerAdvanced: with noise added over all steps of an empty latent it is KSampler's txt2img run
    (ComfyUI cuts the schedule only when ``end_at_step`` is below ``steps``, and then only is leftover
    noise kept); else a :class:`Start` with its step window."""
    latent, add_noise = i["latent_image"], i["add_noise"] == "enable"
    first, last = int(i["start_at_step"]), int(i["end_at_step"])
    if isinstance(latent, LatentValue) and add_noise and first == 0 and last >= i["steps"]:
        return _sampling(node, i, int(i["noise_seed"]))
    start = Start(
        latent,
        start_step=first,
        last_step=last,
        force_full_denoise=i["return_with_leftover_noise"] != "enable",
        add_noise=add_noise,
    )
    return _sampling(node, i, int(i["noise_seed"]), start)


def with_vae(load: LoadSpec, vae: VaeValue, name: str = "vae") -> LoadSpec:
    """``load`` with ``vae`` as its VAE (the model's own when ``vae`` is the same checkpoint's)."""
    if vae.checkpoint and vae.file == load.model:
        return replace(load, vae=None)
    if vae.checkpoint:
        raise _Fail(name, "the VAE comes from another checkpoint than the model; load it with VAELoader")
    return replace(load, vae=vae.file)


def _decode(node: str, i: dict[str, Any], c: Checked, tiling: Tiling | None = None) -> tuple[Any, ...]:
    sampling, vae = i["samples"], i["vae"]
    if not isinstance(sampling, Sampling):
        raise _Fail("samples", "sd35 decodes what a sampler made; link samples to a KSampler's output")
    load = with_vae(sampling.load, vae)
    if sampling.controls and load.vae != sampling.load.vae:
        raise _Fail("vae", "this VAE is not the one the ControlNet images are encoded with; use one VAE")
    return (ImageValue(replace(sampling, load=load), vae, tiling),)


# --- text-encoder loaders, tiled decoding and ControlNets -----------------------------------------


def _clip_files(node: str, names: tuple[str, ...], kind: str, c: Checked) -> tuple[Any, ...]:
    """CLIPLoader and DualCLIPLoader with ``type`` ``kind``: ComfyUI's ``load_clip`` of these files.

    With type ``sd3`` ComfyUI builds SD3's text model from the encoders it finds in the files and feeds
    in for each missing one: no tokens for a missing T5 (the context is the CLIP tokens alone, as ours
    without T5, :class:`sd35.conditioning.encode.TextConditioner`), zeros for a missing CLIP-L or CLIP-G
    (its features and pooled part); sd35 needs both CLIPs, so a set without them is refused. ``device``
    only says where ComfyUI keeps the encoders (sd35 places them by ``--device``/``--memory``); the
    conditioning is the same.
    """
    files = tuple(c.files[(node, name)] for name in names)
    if kind != "sd3":
        raise _Fail("type", f"type {kind!r} makes another model family's text conditioning; use 'sd3'")
    clips = [p for p in files if _text_kinds(p) & {CLIP_L, CLIP_G, "clip"}]
    if len(clips) < 2:
        held = ", ".join(p.name for p in files)
        raise _Fail(
            names[-1],
            f"{held} hold fewer than two CLIP encoders; ComfyUI feeds zeros for a missing CLIP-L or CLIP-G, "
            "sd35 needs both: load clip_l and clip_g with DualCLIPLoader, or all three with TripleCLIPLoader",
        )
    return (ClipValue(files=files),)


def _text_kinds(path: Path) -> frozenset[str]:
    try:
        return frozenset(comp.kind for comp in scan([path]))
    except SD35Error as e:
        raise _Fail(None, e.message, type(e)) from None


def _clip_loader(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return _clip_files(node, ("clip_name",), i["type"], c)


def _dual_clip_loader(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return _clip_files(node, ("clip_name1", "clip_name2"), i["type"], c)


def _decode_tiled(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """VAEDecode in tiles of ``tile_size`` pixels, with sd35's exact tiling
    (:mod:`sd35.models.vae_tiling`): GroupNorms see the whole image's statistics and tiles need no
    overlap, so the image is the untiled one up to float rounding. ComfyUI's ``VAE.decode_tiled_``
    instead decodes each tile on its own (its own statistics, zero padding at its borders), blends
    tiles over ``overlap`` pixels and averages three such passes with tiles of
    ``tile_size``, half-by-double and double-by-half: close to the untiled image, not equal. ``overlap``
    is therefore not needed, and ``temporal_*`` are for video VAEs only (ComfyUI ignores them too)."""
    return _decode(node, i, c, Tiling(max(1, int(i["tile_size"]) // 8)))


def _controlnet_loader(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    path = c.files[(node, "control_net_name")]
    try:
        config = read_controlnet(path).config  # headers only; another family's ControlNet is refused
    except SD35Error as e:
        raise _Fail("control_net_name", e.message.rstrip("."), type(e)) from None
    if config.extra_channels:
        raise _Fail(
            "control_net_name",
            f"{path.name} is an inpainting ControlNet (it reads a mask besides the image); sd35 feeds "
            "ControlNets a control image only",
        )
    return (ControlNetValue(path),)


def _union_type(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """ComfyUI passes the type to union ControlNets (ControlNet++ for SDXL, Flux); SD3 ControlNets have
    no modes (ComfyUI's SD3 ControlNet model takes no ``control_type`` and fails at sampling)."""
    raise _Fail(
        "type", "SD3 ControlNets have no union types; remove SetUnionControlNetType and link the ControlNet"
    )


def _control_apply(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """ControlNetApplyAdvanced (and ControlNetApplySD3, its older name with the VAE required): the
    ControlNet joins every entry of the positive and the negative, after those already there. ComfyUI
    returns the conditionings unchanged for strength 0; a window with start at or past end is never
    active (ComfyUI's ``get_control`` then returns only earlier ControlNets' output), so both are left
    out. SD3 ControlNets read the image through the VAE, so it is required (ComfyUI fails at sampling
    without one)."""
    if i["strength"] == 0 or i["start_percent"] >= i["end_percent"]:
        return i["positive"], i["negative"]
    image, vae = i["image"], i.get("vae")
    if vae is None:
        raise _Fail("vae", "an SD3 ControlNet reads its image through the VAE: link the VAE", InvalidRequest)
    if image_size(image)[2] != 1:
        raise _Fail("image", "a control image must be one image; this one is a batch")
    spec = ControlSpec(
        i["control_net"].file,
        image,
        float(i["strength"]),
        float(i["start_percent"]),
        float(i["end_percent"]),
        vae,
    )
    return tuple(
        tuple(replace(p, controls=(*p.controls, spec)) for p in i[name]) for name in ("positive", "negative")
    )


def _controls(
    positive: tuple[CondPart, ...], negative: tuple[CondPart, ...], model: ModelValue
) -> tuple[ControlSpec, ...]:
    """The ControlNets of a sampling: sd35 runs each on the whole CFG batch, so every entry of the
    positive and negative must carry the same ones (as ControlNetApplyAdvanced makes them); each must fit
    the model and use one VAE."""
    sets = {p.controls for p in (*positive, *negative)}
    if len(sets) > 1:
        raise _Fail(
            "negative",
            "the positive and negative carry different ControlNets; apply them with one "
            "ControlNetApplyAdvanced to both",
        )
    (controls,) = sets
    if not controls:
        return ()
    if len({spec.vae for spec in controls}) > 1:
        raise _Fail("positive", "the ControlNets encode their images with different VAEs; use one VAE")
    main = next((comp for comp in scan([model.file]) if comp.kind == MMDITX), None)
    if main is not None:
        config = MMDiTXConfig.from_state_dict(main.tensors)
        for spec in controls:
            try:
                check_fits(read_controlnet(spec.net).config, config, spec.net.name)
            except SD35Error as e:
                raise _Fail("positive", e.message.rstrip("."), type(e)) from None
    return controls


# ------------------------------------------------------------------------------- image and latent nodes
# LoadImage, LoadImageMask, VAEEncode, VAEEncodeForInpaint, SetLatentNoiseMask, InpaintModelConditioning,
# LatentUpscaleBy, ImageScale(By), and samplers over their latents (ComfyUI v0.3.64 nodes.py).


@dataclass(frozen=True)
class LoadedImage:
    """LoadImage's IMAGE: the file and its size (``batch``: its frames of the first frame's size)."""

    file: Path
    width: int
    height: int
    batch: int


@dataclass(frozen=True)
class LoadedMask:
    """A MASK read from a file: LoadImage's (``channel`` None: 1 - alpha, or an empty 64 x 64 mask) or
    LoadImageMask's ``channel``."""

    file: Path
    channel: str | None
    width: int
    height: int
    batch: int


@dataclass(frozen=True)
class ScaledImage:
    """ImageScale / ImageScaleBy: ``image`` resized to ``width`` x ``height`` by ``method``."""

    image: Any
    method: str
    width: int
    height: int
    crop: str
    batch: int


@dataclass(frozen=True)
class EncodedLatent:
    """VAEEncode (and the inpaint nodes' encoding): ``image`` cropped to whole latent cells and encoded
    with ``vae``; ``fill`` a MASK under which the pixels are grey 0.5 first (VAEEncodeForInpaint)."""

    image: Any
    vae: VaeValue
    fill: Any = None


@dataclass(frozen=True)
class MaskedLatent:
    """A latent with a noise mask (ComfyUI's ``noise_mask``): SetLatentNoiseMask's mask as it is
    (``image_size`` None), or the inpaint nodes' mask resized to the image (``image_size``) and cropped,
    then (``grow`` not None: VAEEncodeForInpaint) rounded and grown by ``grow`` pixels."""

    latent: Any
    mask: Any
    image_size: tuple[int, int] | None = None
    grow: int | None = None


@dataclass(frozen=True)
class UpscaledLatent:
    """LatentUpscaleBy: ``latent`` resized to ``width`` x ``height`` pixels (its cells times 8)."""

    latent: Any
    method: str
    width: int
    height: int


@dataclass(frozen=True)
class Start:
    """Where a sampler over a made latent starts: :class:`~sd35.pipeline.LatentStart`'s settings, with the
    latent as a description."""

    latent: Any
    denoise: float = 1.0
    start_step: int | None = None
    last_step: int | None = None
    force_full_denoise: bool = False
    add_noise: bool = True


def image_size(value: Any) -> tuple[int, int, int]:
    """``(width, height, batch)`` of an IMAGE or MASK description."""
    if isinstance(value, ImageValue):
        return latent_size(value.sampling)
    return value.width, value.height, value.batch


def latent_size(value: Any) -> tuple[int, int, int]:
    """``(width, height, batch)`` in pixels of a LATENT description."""
    if isinstance(value, LatentValue):
        return value.width, value.height, value.batch
    if isinstance(value, Sampling):
        r = value.request
        return r.width, r.height, r.num_images
    if isinstance(value, EncodedLatent):
        width, height, batch = image_size(value.image)
        return width // DOWNSCALE * DOWNSCALE, height // DOWNSCALE * DOWNSCALE, batch
    if isinstance(value, MaskedLatent):
        return latent_size(value.latent)
    return value.width, value.height, latent_size(value.latent)[2]


def encoders(value: Any) -> list[VaeValue]:
    """The VAEs that encode images on the way to a LATENT (up to the sampler before it)."""
    if isinstance(value, EncodedLatent):
        return [value.vae]
    if isinstance(value, (MaskedLatent, UpscaledLatent)):
        return encoders(value.latent)
    return []


def _read(node: str, c: Checked, name: str, read: Callable[[Path], tuple[int, int, int]]) -> Any:
    path = c.files[(node, name)]
    try:
        return path, *read(path)
    except Exception as e:  # PIL raises many kinds for files that are not images
        raise _Fail(name, f"{path.name} is not an image sd35 can read ({e})", InvalidRequest) from None


def _load_image(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    path, width, height, batch = _read(node, c, "image", read_image_size)
    mask_size = (width, height) if alpha_mask(path) else (EMPTY_MASK, EMPTY_MASK)
    return LoadedImage(path, width, height, batch), LoadedMask(path, None, *mask_size, batch)


def _load_image_mask(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    path, width, height, _ = _read(node, c, "image", read_image_size)
    return (LoadedMask(path, i["channel"], width, height, 1),)


def _check_mask(mask: Any, size: tuple[int, int, int], what: str) -> None:
    """A mask must have its image's shape (ComfyUI resizes it; another aspect ratio is a mistake)."""
    mw, mh, _ = image_size(mask)
    width, height, _ = size
    if abs(mw / mh - width / height) > ASPECT_SLACK * (width / height):
        empty = (
            " (LoadImage's mask of an image without alpha is an empty 64x64 one)" if mw == EMPTY_MASK else ""
        )
        raise _Fail(
            "mask",
            f"the mask is {mw}x{mh}{empty} but the {what} is {width}x{height}; give a mask of the {what}'s size",
            InvalidRequest,
        )


def _vae_encode(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    return (EncodedLatent(i["pixels"], i["vae"]),)


def _vae_encode_inpaint(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    size = image_size(i["pixels"])
    _check_mask(i["mask"], size, "image")
    latent = EncodedLatent(i["pixels"], i["vae"], fill=i["mask"])
    return (MaskedLatent(latent, i["mask"], size[:2], int(i["grow_mask_by"])),)


def _set_noise_mask(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    _check_mask(i["mask"], latent_size(i["samples"]), "latent")
    return (MaskedLatent(i["samples"], i["mask"]),)


def _inpaint_conditioning(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """InpaintModelConditioning for SD3.5: the image's latent with the mask as its noise mask. The
    conditionings pass through: ComfyUI adds the masked image to them, which only inpainting models with
    extra input channels read, and SD3.5's MMDiT-X has none."""
    size = image_size(i["pixels"])
    _check_mask(i["mask"], size, "image")
    latent: Any = EncodedLatent(i["pixels"], i["vae"])
    if i["noise_mask"]:
        latent = MaskedLatent(latent, i["mask"], size[:2])
    return i["positive"], i["negative"], latent


def _latent_upscale_by(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    width, height, _ = latent_size(i["samples"])
    cells = (round(width // DOWNSCALE * i["scale_by"]), round(height // DOWNSCALE * i["scale_by"]))
    if min(cells) < 1:
        raise _Fail("scale_by", f"scale_by {i['scale_by']} leaves no latent cell", InvalidRequest)
    return (UpscaledLatent(i["samples"], i["upscale_method"], cells[0] * DOWNSCALE, cells[1] * DOWNSCALE),)


def _image_scale(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    width, height, batch = image_size(i["image"])
    size = scale_size(width, height, int(i["width"]), int(i["height"]))
    return (ScaledImage(i["image"], i["upscale_method"], *size, i["crop"], batch),)


def _image_scale_by(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    width, height, batch = image_size(i["image"])
    size = (round(width * i["scale_by"]), round(height * i["scale_by"]))
    if min(size) < 1:
        raise _Fail("scale_by", f"scale_by {i['scale_by']} leaves no pixel", InvalidRequest)
    return (ScaledImage(i["image"], i["upscale_method"], *size, "disabled", batch),)


_IMAGE_HANDLERS: dict[str, Handler] = {
    "LoadImage": _load_image,
    "LoadImageMask": _load_image_mask,
    "VAEEncode": _vae_encode,
    "VAEEncodeForInpaint": _vae_encode_inpaint,
    "SetLatentNoiseMask": _set_noise_mask,
    "InpaintModelConditioning": _inpaint_conditioning,
    "LatentUpscaleBy": _latent_upscale_by,
    "ImageScale": _image_scale,
    "ImageScaleBy": _image_scale_by,
}


HANDLERS: dict[str, Handler] = {
    "CheckpointLoaderSimple": _checkpoint,
    "UNETLoader": _unet,
    "TripleCLIPLoader": _triple_clip,
    "VAELoader": _vae,
    "LoraLoader": _lora,
    "LoraLoaderModelOnly": _lora_model_only,
    "CLIPTextEncode": _text,
    "CLIPTextEncodeSD3": _text_sd3,
    "ConditioningZeroOut": _zero_out,
    "ConditioningSetTimestepRange": _timestep_range,
    "ConditioningCombine": _combine,
    "ModelSamplingSD3": _model_sampling,
    "SkipLayerGuidanceSD3": _slg,
    "EmptySD3LatentImage": _empty_latent,
    "KSampler": _ksampler,
    "KSamplerAdvanced": _ksampler_advanced,
    "VAEDecode": _decode,
    "SaveImage": lambda node, i, c: (),
    "PreviewImage": lambda node, i, c: (),
    # text-encoder loaders, tiled decoding and ControlNets
    "CLIPLoader": _clip_loader,
    "DualCLIPLoader": _dual_clip_loader,
    "VAEDecodeTiled": _decode_tiled,
    "ControlNetLoader": _controlnet_loader,
    "ControlNetApplyAdvanced": _control_apply,
    "ControlNetApplySD3": _control_apply,
    "SetUnionControlNetType": _union_type,
}
"""Each node's meaning, by class name (the same names as :data:`sd35.workflows.nodes.NODES`)."""
HANDLERS |= _IMAGE_HANDLERS


def evaluate(checked: Checked) -> Plan:
    """The samplings a checked workflow asks for and the output nodes that show them."""
    values: dict[str, tuple[Any, ...]] = {}
    plan = Plan(notes=list(checked.notes))
    for node_id in checked.order:
        node = checked.workflow[node_id]
        inputs = {
            name: values[str(v[0])][v[1]] if is_link(v) else v for name, v in declared_inputs(node).items()
        }
        try:
            values[node_id] = HANDLERS[node["class_type"]](node_id, inputs, checked)
        except _Fail as e:
            error = error_entry(
                "unsupported" if e.kind is Unsupported else "invalid_input", e.message, e.name
            )
            where = f"node {node_id} ({node['class_type']})" + (f" input {e.name!r}" if e.name else "")
            raise WorkflowError(
                f"workflow: {where}: {e.message}.",
                param="workflow",
                node_errors={
                    node_id: {"errors": [error], "dependent_outputs": [], "class_type": node["class_type"]}
                },
            ) from None
        if node_id in checked.outputs:
            prefix = inputs.get("filename_prefix") if node["class_type"] == "SaveImage" else None
            plan.outputs.append(Output(node_id, inputs["images"], prefix))
    return plan
