"""The package's import layering (llm2clip_fast/__init__.py's docstring states it): a module imports only
from its own layer or lower ones, and no modules import each other in a circle of any length, at
module level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. "(base)": the package itself and its one-job helper modules.
LAYERS = {
    "(base)": 0, "_extensions": 0, "atomic_files": 0, "cli_exit_codes": 0, "fp32_matmul": 0,
    "third_party_notices": 0, "missing_dependency": 0, "redaction": 0, "safetensors_files": 0,
    "writable_output": 0, "device_memory": 0,
    "kernels": 1, "data": 1, "distributed": 1,
    "ops": 2,
    "losses": 3,
    "models": 4,
    "convert": 5,
    "eval": 6,
    "train": 7, "info": 7,
}
# None: the global-batch losses live in ops/ on top of distributed's collectives.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "llm2clip_fast").rglob("*.py"):
        if "kernels" in path.relative_to(ROOT).parts:  # a checkout's symlink; the real folder is below
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    for path in (ROOT / "llm2clip_kernels").glob("*.py"):
        found["llm2clip_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return "(base)" if len(parts) == 1 else parts[1]


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from pkg import sub` depends on the submodule, not on what pkg/__init__ runs.
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    out.add(submodule)
                elif target in known:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
    return out


def test_every_module_has_a_layer():
    assert {_layer(m) for m in _modules()} <= set(LAYERS)


def test_no_module_imports_a_higher_layer():
    known = _modules()
    upward = []
    for name, path in known.items():
        for target in _imports(name, path, known):
            src, dst = _layer(name), _layer(target)
            if LAYERS[dst] > LAYERS[src] and (src, dst) not in ALLOWED_UPWARD:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def _import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) - {name} for name, path in known.items()}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _shortest_circle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One concrete circle through the component's first module: start -> ... -> start."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a circle")


def test_circle_finder_sees_circles_of_any_length():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert sorted(map(sorted, _circles(graph))) == [["a", "b", "c"], ["e", "f"]]
    assert _shortest_circle(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert _shortest_circle(graph, {"e", "f"}) == ["e", "f", "e"]


def test_imports_inside_functions_count(tmp_path):
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from .other import g\n    return g\n", encoding="utf-8")
    known = {"pkg.late": module, "pkg.other": tmp_path / "other.py"}
    assert _imports("pkg.late", module, known) == {"pkg.other"}


def _describe(graph: dict[str, set[str]], component: set[str]) -> str:
    circle = _shortest_circle(graph, component)
    if len(component) == len(circle) - 1:
        return " -> ".join(circle)
    return " -> ".join(circle) + f"  (circles tie {len(component)} modules: {', '.join(sorted(component))})"


def test_no_modules_import_each_other_in_a_circle():
    graph = _import_graph()
    circles = _circles(graph)
    described = sorted(_describe(graph, c) for c in circles)
    assert not circles, f"{len(circles)} import circle(s):\n" + "\n".join(described)
