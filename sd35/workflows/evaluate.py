"""What each node means: a checked workflow evaluated into one request per sampler node.

Values are descriptions, not tensors: a MODEL is the file it comes from plus what later nodes set on it
(the flow shift, Skip Layer Guidance, LoRAs), a CONDITIONING the texts and timestep ranges it is made of,
a LATENT its size, an IMAGE the sampler node and VAE that make it. KSampler turns them into one
:class:`~sd35.request.GenerateRequest` with ComfyUI's meaning (ComfyUI's sampler and scheduler names,
``noise="comfyui"``, ``batch_noise="batch"``, ``(word:1.2)`` emphasis as ComfyUI weighs it, SLG by sigma),
so the image is the one ``sd35 generate`` makes with those options: one sampling path. What a request
cannot say (a positive prompt with a timestep range, two different prompts in CLIPTextEncodeSD3, a LoRA
with different model and CLIP strengths, denoise below 1 on an empty latent) is an Unsupported error
naming the node and input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
from sd35.request import GenerateRequest, LoraRef, TextOptions
from sd35.sampling.guidance import SkipLayerGuidance
from sd35.workflows.graph import Checked, declared_inputs, error_entry, is_link


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
    image: ImageValue
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
    """One KSampler: what to load and the request to run (``controls``: its ControlNets, whose images
    :func:`sd35.workflows.run.run_plan` makes first and puts into ``request.controls``)."""

    node: str
    load: LoadSpec
    request: GenerateRequest
    controls: tuple[ControlSpec, ...] = ()


@dataclass(frozen=True)
class ImageValue:
    """An IMAGE: the images of a sampling, decoded by ``vae`` (in tiles: ``tiling``)."""

    sampling: Sampling
    vae: VaeValue
    tiling: Tiling | None = None


@dataclass
class Output:
    """A SaveImage (``prefix``) or PreviewImage (``prefix`` None) node and the images it shows."""

    node: str
    image: ImageValue
    prefix: str | None


@dataclass
class Plan:
    """A checked workflow's work: the samplings to run and the output nodes that show their images."""

    outputs: list[Output] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


def _sampling(node: str, i: dict[str, Any], seed: int) -> tuple[Any, ...]:
    """One full txt2img sampling from an empty latent, as KSampler (and KSamplerAdvanced over all steps)."""
    model, latent = i["model"], i["latent_image"]
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
    if controls:
        load = replace(load, vae=_vae_file(controls[0].vae, model.file, "positive"))
    return (Sampling(node, load, request, controls),)


def _ksampler(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    if i["denoise"] != 1.0:
        raise _Fail("denoise", "denoise below 1 on an empty latent is not supported; use 1.0")
    return _sampling(node, i, int(i["seed"]))


def _ksampler_advanced(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    """KSamplerAdvanced with noise added, from step 0 to the end: KSampler's run (ComfyUI cuts the
    schedule only when ``end_at_step`` is below ``steps``, and then only is leftover noise kept)."""
    if i["add_noise"] != "enable":
        raise _Fail("add_noise", "add_noise 'disable' (a second pass over a noisy latent) is not supported")
    if i["start_at_step"] != 0:
        raise _Fail("start_at_step", "starting past step 0 is not supported; use 0")
    if i["end_at_step"] < i["steps"]:
        raise _Fail("end_at_step", f"ending before the last step ({i['steps']}) is not supported")
    return _sampling(node, i, int(i["noise_seed"]))


def _decode(node: str, i: dict[str, Any], c: Checked, tiling: Tiling | None = None) -> tuple[Any, ...]:
    sampling, vae = i["samples"], i["vae"]
    file = _vae_file(vae, sampling.load.model, "vae")
    if sampling.controls and sampling.load.vae != file:
        raise _Fail("vae", "this VAE is not the one the ControlNet images are encoded with; use one VAE")
    if file is not None:
        sampling = replace(sampling, load=replace(sampling.load, vae=file))
    return (ImageValue(sampling, vae, tiling),)


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
    if not isinstance(image, ImageValue):
        raise _Fail(
            "image", f"a control image from {type(image).__name__} is not supported; use a decoded image"
        )
    if image.sampling.request.num_images != 1:
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


def _vae_file(vae: VaeValue, model: Path, name: str) -> Path | None:
    """The file :class:`LoadSpec` ``vae`` names for ``vae`` next to ``model``: None for the model
    checkpoint's own; input ``name`` is refused for another checkpoint's."""
    if not vae.checkpoint:
        return vae.file
    if vae.file != model:
        raise _Fail(name, "the VAE comes from another checkpoint than the model; load it with VAELoader")
    return None


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
