"""The package's layers are its folders, and the imports follow them (parsed with ast, nothing is
imported):

    method  <-  flows  <-  backends  <-  entry  <-  lab

A module imports its own folder and the folders to its left only; a backend imports no other
backend and, of ``flows``, only the job's helpers; ``modules.*`` is called from ``flows/webui.py``
alone and Forge's ``backend.*`` from ``backends/forge.py`` alone; ``method`` imports nothing of a
host; the product never imports ``lab``; the module graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "accdiffusion"
LAYERS = ("method", "flows", "backends", "entry", "lab")
HOST_PACKAGES = {"modules", "backend", "ldm", "sgm", "k_diffusion", "gradio", "fastapi", "scripts", "ldm_patched",
                 "modules_forge"}
BACKEND_MAY_USE = {"flows.job", "flows.rows"}  # the job's helpers; never the flows that drive a backend
ONLY_IMPORTER = {"modules": {"flows.webui"}, "backend": {"backends.forge"}, "ldm_patched": {"backends.forge"},
                 "modules_forge": {"backends.forge", "flows.webui"}}


def module_name(path: Path) -> str:
    """``method.hires``, ``lab.toy.model``; a package's ``__init__`` is the package itself."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, level: int, module: str | None) -> list[str]:
    """The package-relative dotted name a relative import points at (``""`` is the package root)."""
    base = importer.split(".") if importer else []
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return base + (module.split(".") if module else [])


def imports_of(path: Path, name: str | None = None) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level packages) imported anywhere in the file, TYPE_CHECKING
    and function-local imports included. Package modules are dotted names below ``accdiffusion``."""
    name = module_name(path) if name is None else name
    is_package = path.name == "__init__.py"
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = resolve(name, is_package, node.level, node.module)
            elif node.module and node.module.split(".")[0] == "accdiffusion":
                target = node.module.split(".")[1:]
            else:
                outside.add((node.module or "").split(".")[0])
                continue
            for alias in node.names:  # `from ..method import hires` imports the module method.hires
                inside.add(".".join(target + [alias.name]) if is_module(target + [alias.name]) else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                (inside.add(".".join(parts[1:])) if parts[0] == "accdiffusion" and len(parts) > 1
                 else outside.add(parts[0]))
    inside.discard("")
    return inside, outside


def is_module(parts: list[str]) -> bool:
    path = PACKAGE.joinpath(*parts)
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")
            if module_name(path) and module_name(path) not in LAYERS}


def layer_of(module: str) -> str:
    return module.split(".")[0]


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
        layer = layer_of(name)
        if layer not in LAYERS:
            problems.append(f"{name} lies outside the layer folders {LAYERS}")
            continue
        rank = LAYERS.index(layer)
        for target in sorted(inside):
            target_layer = layer_of(target)
            if target_layer not in LAYERS:
                problems.append(f"{name} imports {target}, which lies outside the layer folders")
            elif LAYERS.index(target_layer) > rank:
                problems.append(f"{layer} module {name} imports {target} from the {target_layer} layer above it")
            elif layer == "backends" and target_layer == "backends" and target != name:
                problems.append(f"backend {name} imports another backend, {target}")
            elif layer == "backends" and target_layer == "flows" and target not in BACKEND_MAY_USE:
                problems.append(f"backend {name} imports {target} (of flows only {sorted(BACKEND_MAY_USE)})")
        if layer == "method" and outside & HOST_PACKAGES:
            problems.append(f"method module {name} imports the host: {sorted(outside & HOST_PACKAGES)}")
        for package, allowed in ONLY_IMPORTER.items():
            if package in outside and name not in allowed:
                problems.append(f"{name} imports {package}.* (only {sorted(allowed)} may)")
    cycle = find_cycle({name: inside for name, (inside, _) in modules.items()})
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def test_every_module_lies_in_a_layer_and_the_imports_follow_the_layers():
    modules = graph()
    assert {"method.hires", "method.attention", "flows.job", "flows.rows", "flows.webui", "backends.a1111",
            "backends.forge", "entry.facade", "entry.surfaces", "lab.reference", "lab.toy.model"} <= set(modules)
    assert check_layout(modules) == []
    # the graph is really parsed: the facade reaches both backends and both flows
    assert modules["entry.facade"][0] >= {"backends.a1111", "backends.forge", "flows.txt2img", "flows.img2img",
                                          "flows.job"}
    assert "modules" in modules["flows.webui"][1] and "backend" in modules["backends.forge"][1]


def test_layout_check_catches_each_rule_broken(tmp_path):
    def with_line(module: str, line: str) -> dict[str, tuple[set[str], set[str]]]:
        modules = graph()
        source = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
        path = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source.read_text() + "\n" + line + "\n")
        modules[module] = imports_of(path, module)
        return modules

    def problems_of(module: str, line: str) -> list[str]:
        return check_layout(with_line(module, line))

    assert any("backend backends.forge imports another backend, backends.a1111" in p
               for p in problems_of("backends.forge", "from .a1111 import A1111Backend"))
    assert any("backend backends.a1111 imports flows.txt2img" in p
               for p in problems_of("backends.a1111", "from ..flows.txt2img import make_hr_pass"))
    assert any("method module method.tiles imports flows.job from the flows layer above it" in p
               for p in problems_of("method.tiles", "from ..flows.job import Job"))
    assert any("method module method.words imports the host" in p
               for p in problems_of("method.words", "import modules.shared"))
    assert any("flows.job imports modules.*" in p for p in problems_of("flows.job", "from modules import shared"))
    assert any("flows.webui imports backend.*" in p
               for p in problems_of("flows.webui", "from backend import memory_management"))
    assert any("entry module entry.facade imports lab.reference from the lab layer above it" in p
               for p in problems_of("entry.facade", "from ..lab import reference"))
    assert any("flows module flows.img2img imports lab.bench" in p
               for p in problems_of("flows.img2img", "import accdiffusion.lab.bench"))
    # an engine module reaching up makes a cycle as well as a layering error
    modules = with_line("method.tileprompts", "from ..flows.rows import split_cond")
    problems = check_layout(modules)
    assert any(p.startswith("import cycle:") for p in problems), problems
    # a module dropped beside the folders
    modules = graph()
    modules["helpers"] = (set(), set())
    assert "helpers lies outside the layer folders" in " ".join(check_layout(modules))


def test_surfaces_marker_matches_the_job():
    """entry.surfaces stays host-free and loads at WebUI start, so it spells the job's attribute itself."""
    from accdiffusion.entry import surfaces
    from accdiffusion.flows import job

    assert surfaces.JOB_ATTR == job.JOB_ATTR
