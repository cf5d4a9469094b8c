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

from sd35.errors import InvalidRequest, SD35Error, Unsupported, WorkflowError
from sd35.lora.summary import summarize_lora
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


@dataclass(frozen=True)
class LatentValue:
    width: int
    height: int
    batch: int


@dataclass(frozen=True)
class LoadSpec:
    """The files :func:`sd35.load_pipeline` loads: the model, text encoders (None: the model's) and VAE
    (None: the model's)."""

    model: Path
    text_encoders: tuple[Path, ...] | None = None
    vae: Path | None = None


@dataclass(frozen=True)
class Sampling:
    """One KSampler: what to load and the request to run."""

    node: str
    load: LoadSpec
    request: GenerateRequest


@dataclass(frozen=True)
class ImageValue:
    sampling: Sampling
    vae: VaeValue


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
    return (Sampling(node, _load_spec(model, positive.clip), request),)


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


def _decode(node: str, i: dict[str, Any], c: Checked) -> tuple[Any, ...]:
    sampling, vae = i["samples"], i["vae"]
    if not (vae.checkpoint and vae.file == sampling.load.model):
        load = sampling.load
        if vae.checkpoint and vae.file != load.model:
            raise _Fail("vae", "the VAE comes from another checkpoint than the model; load it with VAELoader")
        sampling = replace(sampling, load=replace(load, vae=vae.file))
    return (ImageValue(sampling, vae),)


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
