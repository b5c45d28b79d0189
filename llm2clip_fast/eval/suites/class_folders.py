"""Zero-shot classification on class-per-folder sets: ImageNet-1k val and any folder-per-class set.

ImageNet: ``ROOT/val/<wnid>/*.JPEG``, the 1,000 folders in sorted WordNet-id order being class
indices 0..999 (the order of the packaged OpenAI class names); each class is embedded from the 80
OpenAI templates. Any other class-per-folder set works the same way with ``classnames`` (and
optionally ``templates``) files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .suite_data import ClassificationSuite, SuiteLayoutError, is_image_file

IMAGENET_LAYOUT = ("  ROOT/val/<wnid>/*.JPEG   ImageNet-1k validation images, one folder per class (1,000 "
                   "folders, sorted wnid order = class index)")
FOLDERS_LAYOUT = ("  ROOT/<class folder>/<images>   one folder per class (or under ROOT/val/), with\n"
                  "  --classnames FILE   one class name per line in sorted folder order, 'folder<TAB>name' "
                  "lines, or a JSON {folder: name} object\n"
                  "  --templates FILE    optional: one prompt template per line, '{}' (or '{label}') marking "
                  "the class name (default: the 80 OpenAI ImageNet templates)")


def packaged_lines(name: str) -> list[str]:
    """Lines of a data file shipped in ``eval/suites/data`` (see data/SOURCE.md)."""
    text = resources.files(__package__).joinpath("data").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def imagenet_class_names() -> list[str]:
    """The 1,000 OpenAI ImageNet class names, in class-index order."""
    return packaged_lines("imagenet_classnames.txt")


def openai_imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates, ``{}`` marking the class name."""
    return packaged_lines("openai_imagenet_templates.txt")


def read_templates(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--templates: no file {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    templates = [line.strip().replace("{label}", "{}") for line in lines]
    templates = [t for t in templates if t]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"--templates {path}: every line needs exactly one '{{}}' (or '{{label}}') for the "
                         f"class name; offending lines: {bad[:3] or 'the file is empty'}")
    return templates


def read_class_names(path: str | Path, folders: list[str]) -> list[str]:
    """Class names for ``folders`` (sorted) from a names file: a JSON object ``{folder: name}``, lines
    ``folder<TAB>name``, or plain lines in folder order (one per folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--classnames: no file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError(f"--classnames {path}: a JSON class-name file must be an object "
                             "{folder: name}")
    else:
        lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
        if lines and all("\t" in line for line in lines):
            mapping = dict(line.split("\t", 1) for line in lines)
        else:
            if len(lines) != len(folders):
                raise ValueError(f"--classnames {path} has {len(lines)} names for {len(folders)} class "
                                 "folders (plain lines map to the folders in sorted order; use "
                                 "'folder<TAB>name' lines to name a subset)")
            return [line.strip() for line in lines]
    unnamed = [f for f in folders if f not in mapping]
    if unnamed:
        raise ValueError(f"--classnames {path} names no class for the folders {unnamed[:5]}")
    return [str(mapping[f]).strip() for f in folders]


def read_class_folders(name: str, root: str | Path, classnames: str | Path | None = None,
                       templates: str | Path | None = None) -> ClassificationSuite:
    """``imagenet``: ``root/val/<wnid>/``; ``classfolders``: ``root/val/`` if present, else ``root``."""
    root = Path(root)
    layout = IMAGENET_LAYOUT if name == "imagenet" else FOLDERS_LAYOUT
    if name == "imagenet":
        base = root / "val"
        if not base.is_dir():
            raise SuiteLayoutError(name, base, layout)
    else:
        base = root / "val" if (root / "val").is_dir() else root
        if not base.is_dir():
            raise SuiteLayoutError(name, base, layout)
        if classnames is None:
            raise ValueError(f"the {name} suite needs --classnames FILE; layout:\n{layout}")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not folders:
        raise SuiteLayoutError(name, base / "<class>", layout, "no class folders")
    if classnames is not None:
        names = read_class_names(classnames, folders)
    else:
        names = imagenet_class_names()
        if len(folders) != len(names):
            raise SuiteLayoutError(name, base / "<wnid>", layout,
                                   f"found {len(folders)} class folders, the packaged ImageNet names cover "
                                   f"{len(names)}; pass --classnames for a subset or another set")
    prompts = read_templates(templates) if templates is not None else openai_imagenet_templates()
    images, ids, labels = [], [], []
    for index, folder in enumerate(folders):
        for path in sorted((base / folder).iterdir()):
            if is_image_file(path):
                images.append(path)
                ids.append(str(path.relative_to(root)))
                labels.append(index)
    if not images:
        raise SuiteLayoutError(name, base / "<class>" / "<image>", layout, "the class folders hold no images")
    return ClassificationSuite(name, root, images, ids, labels, names, prompts)
