"""Reading a ComfyUI workflow and checking it before anything runs.

A workflow in API format is ``{node_id: {"class_type": ..., "inputs": {name: value | [node_id, output]}}}``
(ComfyUI's "Save (API)", and the ``prompt`` text chunk of every PNG ComfyUI saves). :func:`check`
finds every problem at once and raises one :class:`~sd35.errors.WorkflowError` whose ``node_errors``
have ComfyUI's shape (``execution.py`` ``validate_prompt``): per node id its ``errors`` (``type``,
``message``, ``details``, ``extra_info.input_name``), the output nodes that depend on it and its
``class_type``. Only nodes an output node needs are checked and run, as in ComfyUI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sd35.errors import InvalidRequest, NotFound, SD35Error, WorkflowError
from sd35.workflows.inputs import InputDir
from sd35.workflows.models import ModelsDir, text_role
from sd35.workflows.nodes import LINK_TYPES, NODES, Input

Workflow = dict[str, dict[str, Any]]


@dataclass
class Source:
    """A workflow as read: the API-format graph, and the UI-format ``workflow`` a ComfyUI PNG also carries
    (kept to embed it again in the images, as ComfyUI does; None for an API-format JSON file)."""

    prompt: Workflow
    ui: Any = None


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{what}: not valid JSON ({e}).", param="workflow") from None


def as_workflow(data: Any, what: str) -> Workflow:
    """``data`` checked to be an API-format graph (a ``{"prompt": graph}`` body, as posted to ComfyUI's
    ``/prompt``, is accepted too); the UI format gets a message saying how to export the API format."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data:
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise InvalidRequest(
            f"{what}: this is ComfyUI's UI format; export the workflow with Workflow > Export (API) "
            "(or take the PNG ComfyUI saved, which carries both).",
            param="workflow",
        )
    if not isinstance(data, dict) or not data:
        raise InvalidRequest(f"{what}: a workflow must be a JSON object of nodes by id.", param="workflow")
    for node_id, node in data.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)):
            raise InvalidRequest(
                f"{what}: node {node_id} has no class_type; is this an API-format workflow?", param="workflow"
            )
        if not isinstance(node.get("inputs", {}), dict):
            raise InvalidRequest(f"{what}: node {node_id}'s inputs must be an object.", param="workflow")
    return {
        str(k): {"class_type": v["class_type"], "inputs": dict(v.get("inputs", {}))} for k, v in data.items()
    }


def read_source(path: str | Path) -> Source:
    """The workflow in a ``.json`` file (API format) or a PNG ComfyUI saved (its ``prompt`` chunk)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such workflow file.", param="workflow")
    if path.suffix.lower() == ".json":
        return Source(as_workflow(_parse_json(path.read_text(encoding="utf-8"), str(path)), str(path)))
    try:
        with Image.open(path) as im:
            chunks = dict(getattr(im, "text", {}) or im.info)
    except Exception as e:  # PIL raises many kinds for broken files
        raise InvalidRequest(f"{path}: neither a .json workflow nor a readable image ({e}).") from None
    if not isinstance(chunks.get("prompt"), str):
        raise InvalidRequest(
            f"{path}: this image carries no ComfyUI workflow (no 'prompt' text chunk); give the PNG ComfyUI "
            "saved, or the workflow's API-format JSON.",
            param="workflow",
        )
    ui = chunks.get("workflow")
    ui = json.loads(ui) if isinstance(ui, str) and ui.strip().startswith("{") else None
    return Source(as_workflow(_parse_json(chunks["prompt"], f"{path} (prompt)"), str(path)), ui)


def set_input(workflow: Workflow, assignment: str) -> None:
    """Apply ``NODE.INPUT=VALUE`` (the value read as JSON when it parses, else as text) to ``workflow``."""
    target, sep, text = assignment.partition("=")
    node_id, dot, name = target.partition(".")
    if not (sep and dot and node_id and name):
        raise InvalidRequest(f"--set takes NODE.INPUT=VALUE, got {assignment!r}.", param="set")
    if node_id not in workflow:
        raise InvalidRequest(
            f"--set {assignment!r}: there is no node {node_id}; the workflow has {', '.join(workflow)}.",
            param="set",
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    workflow[node_id]["inputs"][name] = value


def is_link(value: Any) -> bool:
    """ComfyUI's link: ``[node_id, output_index]``."""
    return isinstance(value, list) and len(value) == 2


# ------------------------------------------------------------------------------------------ checks


@dataclass
class Checked:
    """A workflow that passed :func:`check`: the nodes to run in order, each model name's file, and the
    notes on model names found by content."""

    workflow: Workflow
    order: list[str]
    outputs: list[str]
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def error_entry(kind: str, message: str, name: str | None = None, details: str = "") -> dict[str, Any]:
    """One entry of a node's ``errors`` in ComfyUI's shape."""
    return {
        "type": kind,
        "message": message,
        "details": details,
        "extra_info": {} if name is None else {"input_name": name},
    }


def _widget_error(spec: Input, name: str, value: Any) -> dict[str, Any] | None:
    """The error for a widget value that does not fit its input (ComfyUI's ``validate_inputs`` checks)."""
    if spec.type == "INT":
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            return error_entry("invalid_input_type", f"{name} must be a whole number, got {value!r}", name)
    elif spec.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return error_entry("invalid_input_type", f"{name} must be a number, got {value!r}", name)
    elif spec.type == "BOOLEAN":
        if not isinstance(value, bool):
            return error_entry("invalid_input_type", f"{name} must be true or false, got {value!r}", name)
    elif spec.type in ("STRING", "MODEL_NAME", "IMAGE_NAME"):
        if not isinstance(value, str):
            return error_entry("invalid_input_type", f"{name} must be text, got {value!r}", name)
    elif spec.type == "COMBO" and value not in spec.choices:
        return error_entry(
            "value_not_in_list",
            f"{name}: {value!r} not in the list",
            name,
            f"choose one of: {', '.join(spec.choices)}",
        )
    if spec.min is not None and value < spec.min:
        return error_entry(
            "value_smaller_than_min", f"{name} {value} is below the minimum {spec.min:g}", name
        )
    if spec.max is not None and value > spec.max:
        return error_entry("value_bigger_than_max", f"{name} {value} is above the maximum {spec.max:g}", name)
    return None


def _node_errors(workflow: Workflow, node_id: str) -> Iterator[dict[str, Any]]:
    """The structural errors of one node: its type, each input's presence, links and widget values."""
    node = workflow[node_id]
    kind = NODES.get(node["class_type"])
    if kind is None:
        yield error_entry(
            "missing_node_type",
            f"node type {node['class_type']!r} is not one sd35 runs",
            details=f"sd35 runs: {', '.join(sorted(NODES))}",
        )
        return
    inputs = node["inputs"]
    for name, spec in kind.inputs.items():
        if name not in inputs:
            if not spec.optional:
                yield error_entry("required_input_missing", f"required input {name!r} is missing", name)
            continue
        value = inputs[name]
        if is_link(value):
            source, index = str(value[0]), value[1]
            if source not in workflow:
                yield error_entry(
                    "bad_linked_input", f"{name} links to node {source}, which is not in the workflow", name
                )
                continue
            source_kind = NODES.get(workflow[source]["class_type"])
            if source_kind is None:
                continue  # that node's own error says why
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or not 0 <= index < len(source_kind.outputs)
            ):
                yield error_entry(
                    "bad_linked_input",
                    f"{name} links to output {index!r} of node {source} ({workflow[source]['class_type']}), "
                    f"which has {len(source_kind.outputs)} outputs",
                    name,
                )
                continue
            got = source_kind.outputs[index]
            if got != spec.type:
                yield error_entry(
                    "return_type_mismatch",
                    f"{name} needs {spec.type}, but node {source} output {index} is {got}",
                    name,
                    f"received_type({got}) mismatch input_type({spec.type})",
                )
        elif spec.type in LINK_TYPES:
            yield error_entry(
                "bad_linked_input", f"{name} must be a link to a {spec.type} output, got {value!r}", name
            )
        else:
            error = _widget_error(spec, name, value)
            if error is not None:
                yield error


def declared_inputs(node: dict[str, Any]) -> dict[str, Any]:
    """A node's inputs that its type declares (ComfyUI reads no others); all of an unknown node's."""
    kind = NODES.get(node["class_type"])
    inputs = node["inputs"]
    return inputs if kind is None else {name: inputs[name] for name in kind.inputs if name in inputs}


def _needed(workflow: Workflow, outputs: list[str]) -> tuple[list[str], list[list[str]]]:
    """The nodes the ``outputs`` need, each after the nodes it links from, and any cycles met."""
    order: list[str] = []
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node_id: str, path: list[str]) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "open":
            cycles.append(path[path.index(node_id) :])
            return
        state[node_id] = "open"
        for value in declared_inputs(workflow[node_id]).values():
            if is_link(value) and str(value[0]) in workflow:
                visit(str(value[0]), [*path, node_id])
        state[node_id] = "done"
        order.append(node_id)

    for out in outputs:
        visit(out, [])
    return order, cycles


def check(workflow: Workflow, models: ModelsDir, inputs: InputDir | None = None) -> Checked:
    """Every problem of ``workflow`` at once, as one WorkflowError; else what :func:`run` needs.

    Checked: node types, required inputs, links (to a node that exists, an output it has, of the right
    type), widget values (type, limits, choices), cycles, model names (resolved in ``models``, or
    found by content; a path is refused) and image names (in ``inputs``, ComfyUI's input folder; a path
    or a link leading out of it is refused).
    """
    errors: dict[str, list[dict[str, Any]]] = {}
    for node_id in workflow:
        if workflow[node_id]["class_type"] not in NODES:
            errors[node_id] = list(_node_errors(workflow, node_id))
    outputs = [
        n for n, node in workflow.items() if (kind := NODES.get(node["class_type"])) and kind.output_node
    ]
    if not outputs and not errors:
        raise WorkflowError(
            "the workflow has no output node (SaveImage or PreviewImage), so nothing would run.",
            param="workflow",
            node_errors={},
        )
    order, cycles = _needed(workflow, outputs)
    for node_id in order:
        found = list(_node_errors(workflow, node_id))
        if found:
            errors.setdefault(node_id, []).extend(e for e in found if e not in errors.get(node_id, []))
    for cycle in cycles:
        errors.setdefault(cycle[0], []).append(
            error_entry(
                "dependency_cycle",
                f"node {cycle[0]} depends on itself: {' -> '.join([*cycle, cycle[0]])}",
                details="a workflow must not loop",
            )
        )
    checked = Checked(workflow, order, outputs)
    if not errors:
        _resolve_models(checked, models, errors)
        _resolve_images(checked, inputs or InputDir(None), errors)
    if errors:
        raise WorkflowError(
            _summary(workflow, errors), param="workflow", node_errors=_shape(workflow, errors, order)
        )
    return checked


def _resolve_models(checked: Checked, models: ModelsDir, errors: dict[str, list[dict[str, Any]]]) -> None:
    """Each model name's file (into ``checked.files``), or its error."""
    for node_id in checked.order:
        node = checked.workflow[node_id]
        used: list[Path] = []
        for name, spec in NODES[node["class_type"]].inputs.items():
            if spec.type != "MODEL_NAME":
                continue
            value = node["inputs"][name]
            try:
                role = spec.role or text_role(value)
                path, note = models.resolve(spec.folder, value, role=role, avoid=used)
            except NotFound as e:
                errors.setdefault(node_id, []).append(error_entry("value_not_in_list", e.message, name))
                continue
            except SD35Error as e:
                errors.setdefault(node_id, []).append(error_entry("invalid_model_name", e.message, name))
                continue
            used.append(path)
            checked.files[(node_id, name)] = path
            if note:
                checked.notes.append(f"node {node_id} ({node['class_type']}) {name}: {note}")


def _resolve_images(checked: Checked, inputs: InputDir, errors: dict[str, list[dict[str, Any]]]) -> None:
    """Each image name's file in the input folder (into ``checked.files``), or its error."""
    for node_id in checked.order:
        node = checked.workflow[node_id]
        for name, spec in NODES[node["class_type"]].inputs.items():
            if spec.type != "IMAGE_NAME":
                continue
            try:
                checked.files[(node_id, name)] = inputs.resolve(node["inputs"][name])
            except NotFound as e:
                errors.setdefault(node_id, []).append(error_entry("value_not_in_list", e.message, name))
            except SD35Error as e:
                errors.setdefault(node_id, []).append(error_entry("invalid_image_name", e.message, name))


def _dependents(workflow: Workflow, order: list[str]) -> dict[str, list[str]]:
    """For each node, the output nodes that need it."""
    out: dict[str, list[str]] = {}
    for output in [n for n in workflow if (k := NODES.get(workflow[n]["class_type"])) and k.output_node]:
        for node_id in _needed(workflow, [output])[0]:
            out.setdefault(node_id, []).append(output)
    return out


def _shape(workflow: Workflow, errors: dict[str, list[dict[str, Any]]], order: list[str]) -> dict[str, Any]:
    dependents = _dependents(workflow, order)
    return {
        node_id: {
            "errors": found,
            "dependent_outputs": dependents.get(node_id, []),
            "class_type": workflow[node_id]["class_type"],
        }
        for node_id, found in errors.items()
    }


def _summary(workflow: Workflow, errors: dict[str, list[dict[str, Any]]]) -> str:
    """One line: the first problem, naming its node and input, and how many more there are."""
    node_id, found = next(iter(errors.items()))
    first = found[0]
    name = first["extra_info"].get("input_name")
    where = f"node {node_id} ({workflow[node_id]['class_type']})" + (f" input {name!r}" if name else "")
    more = sum(len(f) for f in errors.values()) - 1
    details = f" ({first['details']})" if first["details"] else ""
    tail = f"; and {more} more problem{'s' if more > 1 else ''}" if more else ""
    return f"workflow: {where}: {first['message']}{details}{tail}."
