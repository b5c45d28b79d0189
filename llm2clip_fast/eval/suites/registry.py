"""The benchmark suites by name: their readers and the folder names ``--suite all`` looks for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .class_folders import FOLDERS_LAYOUT, IMAGENET_LAYOUT, read_class_folders
from .docci import LAYOUT as DOCCI_LAYOUT
from .docci import read_docci
from .karpathy import LAYOUTS as KARPATHY_LAYOUTS
from .karpathy import read_karpathy
from .sharegpt4v import LAYOUT as SHAREGPT4V_LAYOUT
from .sharegpt4v import read_sharegpt4v
from .suite_data import ClassificationSuite, RetrievalSuite, SuiteLayoutError
from .urban1k import LAYOUT as URBAN1K_LAYOUT
from .urban1k import read_urban1k

Suite = RetrievalSuite | ClassificationSuite


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    read: Callable[..., Suite]
    layout: str
    folders: tuple[str, ...]  # sub-folder names of an --all root (lower case)
    in_all: bool = True


SUITES: dict[str, SuiteSpec] = {s.name: s for s in (
    SuiteSpec("flickr30k", lambda root, **_: read_karpathy("flickr30k", root), KARPATHY_LAYOUTS["flickr30k"],
              ("flickr30k", "flickr")),
    SuiteSpec("coco", lambda root, **_: read_karpathy("coco", root), KARPATHY_LAYOUTS["coco"],
              ("coco", "mscoco", "coco2014")),
    SuiteSpec("urban1k", lambda root, **_: read_urban1k(root), URBAN1K_LAYOUT, ("urban1k", "urban-1k")),
    SuiteSpec("docci", lambda root, **_: read_docci(root), DOCCI_LAYOUT, ("docci",)),
    SuiteSpec("sharegpt4v-1k", lambda root, **_: read_sharegpt4v(root), SHAREGPT4V_LAYOUT,
              ("sharegpt4v-1k", "sharegpt4v", "share4v")),
    SuiteSpec("imagenet", lambda root, classnames=None, templates=None, **_: read_class_folders(
        "imagenet", root, classnames, templates), IMAGENET_LAYOUT, ("imagenet", "imagenet-1k", "imagenet1k")),
    SuiteSpec("classfolders", lambda root, classnames=None, templates=None, **_: read_class_folders(
        "classfolders", root, classnames, templates), FOLDERS_LAYOUT, (), in_all=False),
)}


def _subfolder(root: Path, names: tuple[str, ...]) -> Path | None:
    if not root.is_dir():
        return None
    by_name = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    return next((by_name[n] for n in names if n in by_name), None)


def read_suite(name: str, root: str | Path, **options) -> Suite:
    """Read suite ``name`` from ``root``: the suite's own folder, or a folder holding it under one of
    its usual names (``ROOT/flickr30k/``, ``ROOT/Urban1k/``, ...). ``options``: ``classnames``,
    ``templates`` (class-per-folder suites)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)} or all")
    spec, root = SUITES[name], Path(root)
    if not root.is_dir():
        raise SuiteLayoutError(name, root, spec.layout, "no such folder")
    try:
        return spec.read(root, **options)
    except SuiteLayoutError:
        sub = _subfolder(root, spec.folders)
        if sub is None:
            raise
        return spec.read(sub, **options)


def find_suites(root: str | Path, **options) -> tuple[dict[str, Suite], list[str]]:
    """Every ``--suite all`` suite under ``root`` (one sub-folder each, by its usual names).

    Returns ``(suites read, names not found)``. A suite whose folder exists but does not match its
    layout is an error, raised before anything is embedded.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    found, absent = {}, []
    for name, spec in SUITES.items():
        if not spec.in_all:
            continue
        sub = _subfolder(root, spec.folders)
        if sub is None:
            absent.append(name)
        else:
            found[name] = spec.read(sub, **options)
    if not found:
        expected = "\n".join(f"  ROOT/{spec.folders[0]}/ ({name})" for name, spec in SUITES.items()
                             if spec.in_all)
        raise FileNotFoundError(f"--suite all: no suite folder under {root}; expected any of:\n{expected}")
    return found, absent
