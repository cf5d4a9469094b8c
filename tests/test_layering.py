"""The package's layering, read from the source: who may import whom (imports inside functions count).

- :mod:`sd35.models` is the bottom of the model stack: it imports none of accel, lora, pipeline, cli,
  inspect (the fast paths, LoRA and the front ends build on the model, never the other way round);
- :mod:`sd35.accel.fp8` does not import :mod:`sd35.lora` (both meet in :mod:`sd35.models.contract`);
- :mod:`sd35.lora` imports no front end (pipeline, cli, inspect);
- every module imports only its own layer and those below (:data:`LAYERS`), nothing imports the package
  root, production code never imports :mod:`sd35.testing`, and there is no import circle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sd35

ROOT = Path(sd35.__file__).parent


def _graph() -> dict[str, set[str]]:
    """sd35 module -> the sd35 modules it imports (``from a import b`` counts as a.b when that is a module)."""
    files = {}
    for path in ROOT.rglob("*.py"):
        parts = ["sd35", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_models_import_no_higher_layer():
    bad = {
        (m, t)
        for m, targets in _graph().items()
        if _under(m, "sd35.models")
        for t in targets
        if _under(t, "sd35.accel", "sd35.lora", "sd35.pipeline", "sd35.cli")
    }
    assert not bad


def test_fp8_and_lora_meet_only_in_the_contract():
    graph = _graph()
    assert not {t for t in graph["sd35.accel.fp8"] if _under(t, "sd35.lora")}
    front_ends = ("sd35.pipeline", "sd35.cli")
    assert not {
        (m, t) for m, ts in graph.items() if _under(m, "sd35.lora") for t in ts if _under(t, *front_ends)
    }
    assert (
        "sd35.models.contract" in graph["sd35.accel.fp8"]
        and "sd35.models.contract" in graph["sd35.lora.patching"]
    )


LAYERS: list[tuple[str, ...]] = [
    ("sd35._version", "sd35.errors", "sd35.cpu_threads"),
    ("sd35.files", "sd35.devices"),
    (
        "sd35.loading.tensors",
        "sd35.loading.safetensors_io",
        "sd35.loading.weights",
        "sd35.loading.gguf_io",
        "sd35.loading.gguf_kquants",
        "sd35.loading.gguf_quantize",
        "sd35.loading.gguf_writer",
    ),
    ("sd35.models",),
    (
        "sd35.loading.components",
        "sd35.loading.diffusers_mmditx",
        "sd35.loading.diffusers_vae",
        "sd35.loading.writers",
        "sd35.conditioning",
        "sd35.sampling",
        "sd35.control",
        "sd35.lora",
        "sd35.accel",
        "sd35.memory",
        "sd35.imaging",
        "sd35.image_io",
        "sd35.preview",
        "sd35.prompt_cache",
    ),
    ("sd35.presets", "sd35.a1111", "sd35.request", "sd35.result"),
    ("sd35.pipeline",),
    ("sd35.loading.assemble",),
    ("sd35.train", "sd35.demo", "sd35.bench", "sd35.testing", "sd35.loading.convert", "sd35.workflows"),
    ("sd35.cli", "sd35.server"),
]
"""The package from the bottom up. A module may import its own layer and those below, never one above:
errors and files first, then weight I/O, the networks, what works on them (conditioning, sampling, LoRA,
fast paths, memory, images), the request and its presets, the pipeline, its loader, the tools built on it,
and the front ends. ``sd35`` itself (the public API) only re-exports."""


def _layer(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if _under(module, prefix) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS: place it"
    return best[0]


def test_every_module_imports_only_its_layer_and_below():
    graph = _graph()
    upward = sorted(
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in graph.items()
        if m != "sd35"
        for t in targets
        if t != "sd35" and _layer(t) > _layer(m)
    )
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_package_root_and_only_tests_use_testing():
    graph = _graph()
    assert not [m for m, targets in graph.items() if "sd35" in targets]
    assert not [
        (m, t)
        for m, ts in graph.items()
        if not _under(m, "sd35.testing")
        for t in ts
        if _under(t, "sd35.testing")
    ]


def test_no_import_circle_anywhere():
    graph = _graph()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, " -> ".join([*path[path.index(m) :], m])
        if m in done:
            return
        for t in sorted(graph[m]):
            visit(t, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
