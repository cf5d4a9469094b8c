"""The package's layering, read from the source: who may import whom (imports inside functions count).

- :mod:`sd35.models` is the bottom of the model stack: it imports none of accel, lora, pipeline, cli,
  inspect (the fast paths, LoRA and the front ends build on the model, never the other way round);
- :mod:`sd35.accel.fp8` does not import :mod:`sd35.lora` (both meet in :mod:`sd35.models.contract`);
- :mod:`sd35.lora` imports no front end (pipeline, cli, inspect);
- no import circle among the modules of models, loading, lora and accel.
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
        if _under(t, "sd35.accel", "sd35.lora", "sd35.pipeline", "sd35.cli", "sd35.inspect")
    }
    assert not bad


def test_fp8_and_lora_meet_only_in_the_contract():
    graph = _graph()
    assert not {t for t in graph["sd35.accel.fp8"] if _under(t, "sd35.lora")}
    front_ends = ("sd35.pipeline", "sd35.cli", "sd35.inspect")
    assert not {
        (m, t) for m, ts in graph.items() if _under(m, "sd35.lora") for t in ts if _under(t, *front_ends)
    }
    assert (
        "sd35.models.contract" in graph["sd35.accel.fp8"]
        and "sd35.models.contract" in graph["sd35.lora.patching"]
    )


def test_no_import_circle_in_the_model_stack():
    layers = ("sd35.models", "sd35.loading", "sd35.lora", "sd35.accel")
    graph = {m: {t for t in ts if _under(t, *layers)} for m, ts in _graph().items() if _under(m, *layers)}
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
