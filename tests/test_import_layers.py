"""The package's import layering (llm2clip_fast/__init__.py's docstring states it): a module imports only
from its own layer or lower ones, at module level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. "(base)": the package itself and its one-job helper modules.
LAYERS = {
    "(base)": 0, "_extensions": 0, "atomic_files": 0, "cli_exit_codes": 0, "fp32_matmul": 0,
    "third_party_notices": 0, "missing_dependency": 0, "redaction": 0, "safetensors_files": 0,
    "writable_output": 0,
    "kernels": 1, "data": 1, "distributed": 1,
    "ops": 2,
    "losses": 3,
    "models": 4,
    "convert": 5,
    "train": 6, "info": 6,
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
            for candidate in [target, *(f"{target}.{a.name}" for a in node.names)]:
                if candidate in known:
                    out.add(candidate)
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
