"""Command-line options made from :class:`~sd35.request.GenerateRequest`'s fields, and the request made back.

Each request field is an option: ``steps`` is ``--steps``, a field of a nested setting is prefixed by its
group (``slg.layers`` is ``--slg-layers``) unless its metadata names its flag (``edit.image`` is
``--init-image``, as users know it from A1111 and sd-scripts). A group with a ``switch`` (``--slg``,
``--apg``, ``--hires``) is turned on by it or by any of its own options; every option's help and choices
come from the field's metadata and type, so the CLI cannot drift from the request. Nothing here checks a
value: the request does, once (:meth:`GenerateRequest.validate`), and this module only maps an error's
``param`` back to its flag (:func:`flag_for`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from PIL import Image

from sd35.control.unit import ControlUnit
from sd35.errors import InvalidRequest
from sd35.image_io import read_image, read_mask
from sd35.request import GenerateRequest, LoraRef, TextOptions

MODEL_FLAGS = {
    "model": "--model",
    "text_encoders": "--text-encoders",
    "tokenizers": "--tokenizers",
    "vae": "--vae",
    "variant": "--variant",
    "device": "--device",
    "dtype": "--dtype",
    "memory": "--memory",
    "vae_tiling": "--vae-tiling",
    "fp8": "--fp8",
    "compile": "--compile",
    "cuda_graphs": "--cuda-graphs",
    "output": "--output",
    "prompt": "--prompt",
    "loras": "--lora",
}
"""Flags of the options that are not request fields (or are parsed by hand), by error ``param``."""


@dataclass(frozen=True)
class Option:
    """One request field as a command-line option."""

    path: tuple[str, ...]  # ("slg", "layers"): where the value goes in the request
    flag: str
    hint: Any  # the field's type, None stripped
    help: str
    preset: tuple[str, ...] | None  # the ModelDefaults attribute path that fills it when not given
    default: Any  # the field's own default (dataclasses.MISSING for a required field)

    @property
    def dest(self) -> str:
        return "request__" + "__".join(self.path)

    @property
    def param(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Group:
    """A nested setting (``slg``, ``apg``, ``edit``, ``hires``, ``text``) and its options."""

    name: str
    cls: type
    switch: str | None
    help: str
    options: tuple[Option, ...]


def _strip_none(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _dataclass_of(hint: Any) -> type | None:
    hint = _strip_none(hint)
    return hint if dataclasses.is_dataclass(hint) else None


def _option(
    f: dataclasses.Field,
    hint: Any,
    prefix: tuple[str, ...],
    flag_prefix: str | None,
    group_preset: str | None,
) -> Option:
    name = f.name.replace("_", "-")
    flag = f.metadata.get("flag") or (f"--{flag_prefix}-{name}" if flag_prefix else f"--{name}")
    if (
        group_preset is not None
    ):  # every field of a group the model presets (slg: ModelDefaults.slg.layers ...)
        preset: tuple[str, ...] | None = (group_preset, f.name)
    else:
        preset = (f.metadata["preset"],) if "preset" in f.metadata else None
    return Option(prefix + (f.name,), flag, _strip_none(hint), f.metadata.get("help", ""), preset, f.default)


def request_groups() -> tuple[list[Option], list[Group]]:
    """The request's top-level options, and its nested groups with theirs."""
    top: list[Option] = []
    groups: list[Group] = []
    hints = typing.get_type_hints(GenerateRequest)
    for f in dataclasses.fields(GenerateRequest):
        # --prompt/--prompt-file, --lora FILE[:STRENGTH] and --control FILE ... are parsed by hand
        if f.name in ("prompt", "loras", "controls"):
            continue
        cls = _dataclass_of(hints[f.name])
        if cls is None:
            top.append(_option(f, hints[f.name], (), None, None))
            continue
        prefix = f.metadata.get("prefix", f.name) or None
        sub_hints = typing.get_type_hints(cls)
        group_preset = f.metadata.get("preset")
        options = tuple(
            _option(sf, sub_hints[sf.name], (f.name,), prefix, group_preset) for sf in dataclasses.fields(cls)
        )
        groups.append(Group(f.name, cls, f.metadata.get("switch"), f.metadata.get("help", ""), options))
    return top, groups


def flag_for(param: str | None) -> str | None:
    """The flag of an error's ``param`` (``"edit.mask"`` -> ``"--mask"``), or None if it has none."""
    if param is None:
        return None
    if param in MODEL_FLAGS:
        return MODEL_FLAGS[param]
    if param == "controls" or param.startswith("controls."):
        return "--control" + param[len("controls") :].replace(".", "-").replace("_", "-")
    top, groups = request_groups()
    for option in top + [o for g in groups for o in g.options]:
        if option.param == param:
            return option.flag
    for g in groups:
        if g.name == param:
            return g.switch or (g.options[0].flag if g.options else None)
    return None


# ---------------------------------------------------------------------------------------------- parsing


def _ints(flag: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated whole numbers like 7,8,9, got {text!r}"
            ) from None

    parse.__name__ = flag
    return parse


def _add(group: argparse._ArgumentGroup, option: Option, defaults_text: str) -> None:
    help_text = option.help + defaults_text
    hint = option.hint
    kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": help_text}
    if hint is bool:
        group.add_argument(option.flag, action="store_const", const=True, **kwargs)
        return
    if get_origin(hint) is Literal:
        kwargs["choices"] = list(get_args(hint))
    elif hint is Image.Image:
        kwargs.update(type=Path, metavar="PNG")
    elif get_origin(hint) is tuple:
        kwargs.update(type=_ints(option.flag), metavar="N,N,...")
    elif hint in (int, float, str):
        kwargs.update(type=hint, metavar=option.path[-1].upper())  # not the namespaced dest
    else:
        raise TypeError(f"no command-line form for {option.param}: {hint!r}")
    group.add_argument(option.flag, **kwargs)


def _defaults_text(option: Option, presets: dict[str, Any]) -> str:
    """``" (default: ...)"`` from the presets (model-dependent) or the field's own default."""

    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    if option.preset is not None:
        values = []
        for name, defaults in presets.items():
            value = defaults
            for attr in option.preset:
                value = getattr(value, attr)
            values.append(f"{name} {show(value)}")
        return f" (default: the model's: {', '.join(values)})"
    if option.default in (dataclasses.MISSING, None, False):
        return ""
    return f" (default: {show(option.default)})"


def add_request_arguments(parser: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
    """Add every request option to ``parser``; ``presets`` ({"SD3.5 Medium": ModelDefaults, ...}) for help."""
    top, groups = request_groups()
    gen = parser.add_argument_group("generation")
    for option in top:
        _add(gen, option, _defaults_text(option, presets))
    gen.add_argument(
        "--lora",
        dest="request__loras",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA/LyCORIS/DoRA file (any common format); repeatable; strength default 1.0",
    )
    add_control_arguments(parser)
    for g in groups:
        arg_group = parser.add_argument_group(g.help)
        if g.switch:
            arg_group.add_argument(g.switch, dest=f"request__{g.name}", action="store_true", help=g.help)
        for option in g.options:
            _add(arg_group, option, _defaults_text(option, presets))


CONTROL_DEST = "request__controls"


def _control_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """(flag, field, type) of every ControlUnit field but ``model`` (which is ``--control`` itself)."""
    hints = typing.get_type_hints(ControlUnit)
    return [
        (f"--control-{f.name.replace('_', '-')}", f, hints[f.name])
        for f in dataclasses.fields(ControlUnit)
        if f.name != "model"
    ]


class _ControlAction(argparse.Action):
    """``--control FILE`` starts a unit; each ``--control-*`` option sets a field of the latest one."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        units = getattr(namespace, CONTROL_DEST, None) or []
        setattr(namespace, CONTROL_DEST, units)  # a fresh list per parse (never the parser's default)
        if self.metavar == "FILE":
            units.append({"model": value})
        elif not units:
            raise InvalidRequest(f"{option_string} needs a --control FILE before it.", param="controls")
        else:
            units[-1][self.dest.removeprefix("control__")] = value


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """``--control FILE`` and its ``--control-*`` options (repeatable: the options after a --control are its)."""
    g = parser.add_argument_group("ControlNet (repeatable: options after --control FILE apply to it)")
    g.add_argument(
        "--control", action=_ControlAction, dest=CONTROL_DEST, metavar="FILE", default=None,
        help="an SD3 ControlNet: a diffusers folder or .safetensors file",
    )  # fmt: skip
    for flag, f, hint in _control_fields():
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", f.name.replace("_", " "))}
        if get_origin(hint) is Literal:
            kwargs["choices"] = list(get_args(hint))
        elif hint is Image.Image:
            kwargs.update(type=Path, metavar="IMG")
        else:
            kwargs.update(type=hint, metavar=f.name.upper())
        if f.default is not dataclasses.MISSING:
            kwargs["help"] += f" (default: {f.default})"
        g.add_argument(flag, action=_ControlAction, dest=f"control__{f.name}", default=None, **kwargs)


def parse_controls(raw: list[dict[str, Any]]) -> tuple[ControlUnit, ...]:
    """The units the ``--control`` options describe, their images read."""
    units = []
    for given in raw:
        if "image" not in given:
            raise InvalidRequest(
                f"--control {given['model']} needs --control-image IMG.", param="controls.image"
            )
        image = read_image(given["image"], "control image", param="controls.image")
        units.append(ControlUnit(**{**given, "image": image}))
    return tuple(units)


def parse_lora(value: str) -> LoraRef:
    """``FILE[:STRENGTH]``: a colon and a number at the end is the strength, unless the whole is a file."""
    path, sep, tail = value.rpartition(":")
    if not sep or Path(value).is_file() or not path:
        return LoraRef(value)
    try:
        strength = float(tail)
    except ValueError:
        raise InvalidRequest(
            f"{value!r}: the LoRA strength after the last ':' must be a number, got {tail!r} "
            "(FILE or FILE:STRENGTH, e.g. style.safetensors:0.8).",
            param="loras",
        ) from None
    return LoraRef(path, strength)


def _read(option: Option, value: Any) -> Any:
    if option.hint is Image.Image:
        what = "mask" if option.path[-1] == "mask" else "init image"
        reader = read_mask if what == "mask" else read_image
        return reader(value, what, param=option.param)
    return value


def request_from_args(args: argparse.Namespace, prompt: str) -> GenerateRequest:
    """The :class:`GenerateRequest` the parsed options describe, for ``prompt``."""
    top, groups = request_groups()
    fields: dict[str, Any] = {
        o.path[0]: getattr(args, o.dest) for o in top if getattr(args, o.dest) is not None
    }
    for g in groups:
        given = {o: getattr(args, o.dest) for o in g.options if getattr(args, o.dest) is not None}
        if g.cls is TextOptions:
            fields[g.name] = TextOptions(**{o.path[-1]: v for o, v in given.items()})
            continue
        if not given and not (g.switch and getattr(args, f"request__{g.name}")):
            continue
        for f in dataclasses.fields(g.cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and not any(o.path[-1] == f.name for o in given):
                flag = next(o.flag for o in g.options if o.path[-1] == f.name)
                raise InvalidRequest(
                    f"{', '.join(o.flag for o in given)} need{'s' if len(given) == 1 else ''} {flag}.",
                    param=".".join((g.name, f.name)),
                )
        fields[g.name] = g.cls(**{o.path[-1]: _read(o, v) for o, v in given.items()})
    fields["loras"] = tuple(parse_lora(v) for v in args.request__loras)
    fields["controls"] = parse_controls(getattr(args, CONTROL_DEST, None) or [])
    return GenerateRequest(prompt=prompt, **fields)
