"""The package's import layout: the engine imports no WebUI and no orchestration, the backends
are thin leaves beside each other, and the module graph has no cycle (parsed with ast, nothing is
imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "accdiffusion"
HOST_FACING = {"webui", "job", "passes", "upscale", "facade", "a1111", "forge"}
BACKENDS = {"a1111", "forge"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level modules) imported anywhere in the file, TYPE_CHECKING and
    function-local imports included."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    inside.add(node.module.split(".")[0])
                else:
                    inside.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "accdiffusion":
                rest = node.module.split(".")[1:]
                inside.update(rest[:1] or [alias.name for alias in node.names])
            elif node.module:
                outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                (inside.add(parts[1]) if parts[0] == "accdiffusion" and len(parts) > 1
                 else outside.add(parts[0]))
    return inside, outside


def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {path.stem: imports_of(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def check_layout(modules: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    problems = []
    for name, (inside, outside) in sorted(modules.items()):
        if name not in HOST_FACING:
            if "modules" in outside or "backend" in outside:
                problems.append(f"engine module {name} imports the WebUI")
            if inside & HOST_FACING:
                problems.append(f"engine module {name} imports {sorted(inside & HOST_FACING)}")
        if name in BACKENDS and inside & (BACKENDS - {name} | {"passes", "upscale", "facade"}):
            problems.append(f"backend {name} imports {sorted(inside & (BACKENDS - {name} | {'passes', 'upscale', 'facade'}))}")
        if name != "facade" and "facade" in inside:
            problems.append(f"{name} imports the facade (only the glue may)")
        if name in HOST_FACING - {"webui"} and "modules" in outside:
            problems.append(f"{name} imports modules.* (only webui.py may)")
        if name in {"job", "passes", "upscale", "webui"} and inside & BACKENDS:
            problems.append(f"host-neutral module {name} imports a backend")
    cycle = find_cycle({name: inside for name, (inside, _) in modules.items()})
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def test_package_layout_has_no_circle():
    modules = graph()
    assert HOST_FACING | {"rows", "hires", "attention"} <= set(modules)
    assert check_layout(modules) == []
    assert modules["facade"][0] >= {"a1111", "forge", "passes", "job"}  # the graph is really parsed


def test_layout_check_catches_a_backend_importing_the_other(tmp_path):
    modules = graph()
    forge_path = tmp_path / "forge.py"
    forge_path.write_text((PACKAGE / "forge.py").read_text() + "\nfrom .a1111 import unsupported_reason\n")
    modules["forge"] = imports_of(forge_path)
    problems = check_layout(modules)
    assert any("backend forge imports ['a1111']" in p for p in problems), problems

    modules = graph()
    modules["rows"][0].add("passes")  # an engine module reaching up: a cycle and a layering error
    problems = check_layout(modules)
    assert any(p.startswith("import cycle:") for p in problems) and any("engine module rows" in p for p in problems)


def test_glue_marker_matches_the_job():
    """webui_glue stays host-free, so it spells the job's attribute itself."""
    from accdiffusion import job, webui_glue

    assert webui_glue.JOB_ATTR == job.JOB_ATTR
