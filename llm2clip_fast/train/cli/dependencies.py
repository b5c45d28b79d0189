"""The packages the trainer needs beyond the core install, and a check that names the missing ones.

``pip install llm2clip_fast`` installs the ops and losses with torch (and numpy) alone, like
Liger-Kernel; ``pip install 'llm2clip_fast[train]'`` adds what ``python -m llm2clip_fast.train``
imports. :data:`TRAIN_MODULES` maps each import name to its distribution name; ``pyproject.toml``'s
``train`` extra lists the same distributions (a test keeps the two in step).
"""

from __future__ import annotations

import importlib.util

from ...missing_dependency import MissingDependencyError

# import name -> PyPI distribution. Needed by every sub-command (models, data, progress, checkpoints).
TRAIN_MODULES = {
    "transformers": "transformers",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "PIL": "pillow",
}
# Needed by some features only; each one's own code raises a clear error when it is asked for.
OPTIONAL_TRAIN_MODULES = {
    "peft": "peft",  # stage 1 LoRA
    "bitsandbytes": "bitsandbytes",  # --int8 embedding
    "webdataset": "webdataset",  # WebDataset shards
    "matplotlib": "matplotlib",  # loss.png (skipped with a warning without it)
}


def missing_train_packages() -> list[str]:
    """Distribution names of :data:`TRAIN_MODULES` that cannot be imported here."""
    missing = []
    for module, dist in TRAIN_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a None entry in sys.modules, a broken parent package
            found = False
        if not found:
            missing.append(dist)
    return missing


def require_train_packages(command: str) -> None:
    """Raise :class:`MissingDependencyError` naming every missing trainer package and the install line."""
    missing = missing_train_packages()
    if missing:
        raise MissingDependencyError(
            f"{command} needs {', '.join(missing)}, not installed here; install the trainer's "
            f"packages with: pip install 'llm2clip_fast[train]'")
