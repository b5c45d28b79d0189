"""Flickr30k and COCO retrieval from Karpathy's split files (``dataset_flickr30k.json``,
``dataset_coco.json``).

The test split: 1,000 Flickr30k / 5,000 COCO images, every listed sentence (``sentences[].raw``) a
caption of its image (five for almost all; the few COCO images with more keep them all, as the
25,010-caption COCO 5k test set has). BLIP's copies of the same test split (``flickr30k_test.json``,
``coco_karpathy_test.json``: what LLM2CLIP's own evaluation script downloads) are read too, when the
Karpathy file is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from .suite_data import RetrievalSuite, SuiteLayoutError

SPLIT_FILES = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
# Where the images usually are, relative to the root, for records without a ``filepath``.
IMAGE_FOLDERS = {"flickr30k": ("flickr30k-images", "flickr30k_images", "images", "."),
                 "coco": (".", "images")}

# The same test split as BLIP/ALBEF ship it (what LLM2CLIP's own evaluation downloads): a JSON list of
# {"image": relative path, "caption": [five captions]}.
BLIP_TEST_FILES = {"flickr30k": ("flickr30k_test.json", "test.json"), "coco": ("coco_karpathy_test.json",)}

LAYOUTS = {
    "flickr30k": ("  ROOT/dataset_flickr30k.json       Karpathy's split file (images[].filename, split, "
                  "sentences[].raw)\n"
                  "  ROOT/flickr30k-images/<filename>   the images (or ROOT/flickr30k_images/, ROOT/images/, "
                  "ROOT)\n"
                  "  or ROOT/flickr30k_test.json (BLIP's test split: [{image, caption: [...]}]) with images "
                  "at ROOT/<image>"),
    "coco": ("  ROOT/dataset_coco.json             Karpathy's split file (images[].filepath, filename, "
             "split, sentences[].raw)\n"
             "  ROOT/<filepath>/<filename>         the images, e.g. "
             "ROOT/val2014/COCO_val2014_000000391895.jpg (also under ROOT/images/<filepath>/)\n"
             "  or ROOT/coco_karpathy_test.json (BLIP's test split: [{image, caption: [...]}]) with images "
             "at ROOT/<image> or ROOT/images/<image>"),
}


def read_karpathy(name: str, root: str | Path, split: str = "test") -> RetrievalSuite:
    """The ``split`` images and captions of ``name`` (``flickr30k`` or ``coco``) under ``root``."""
    if name not in SPLIT_FILES:
        raise ValueError(f"Karpathy split suites are {sorted(SPLIT_FILES)}, got {name!r}")
    root = Path(root)
    path = root / SPLIT_FILES[name]
    if path.is_file():
        try:
            records = json.loads(path.read_text(encoding="utf-8"))["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SuiteLayoutError(name, path, LAYOUTS[name], f"not a Karpathy split file: {exc}") from exc
    else:
        blip = next((root / f for f in BLIP_TEST_FILES[name] if (root / f).is_file()), None)
        if blip is None or split != "test":
            raise SuiteLayoutError(name, path, LAYOUTS[name])
        path, records = blip, _blip_records(name, blip)
    if not isinstance(records, list):
        raise ValueError(f"{name}: {path}: 'images' must be a list of image records, got "
                         f"{type(records).__name__}")
    for i, record in enumerate(records):
        _check_record(name, path, i, record)
    wanted = [r for r in records if r.get("split") == split]
    if not wanted:
        raise SuiteLayoutError(name, path, LAYOUTS[name], f"no images with split {split!r}")
    image_dir = _image_dir(name, root, wanted)
    images, ids, captions, owner, skipped = [], [], [], [], {}
    for record in records:
        if record.get("split") != split:
            continue
        rel = Path(record.get("filepath", "")) / record["filename"]
        texts = [s["raw"].strip() for s in record.get("sentences", []) if s.get("raw", "").strip()]
        if not texts:
            skipped[str(rel)] = "no captions"
            continue
        images.append(image_dir / rel)
        ids.append(str(rel))
        owner.extend([len(images) - 1] * len(texts))
        captions.extend(texts)
    if not images:
        raise SuiteLayoutError(name, path, LAYOUTS[name], f"no images with split {split!r} and captions")
    return RetrievalSuite(name, root, images, ids, captions, owner, skipped)


def _check_record(name: str, path: Path, index: int, record: object) -> None:
    """A ValueError naming the file and the record unless ``record`` is a Karpathy image record:
    ``filename`` (and ``filepath``, ``split`` where present) strings, ``sentences`` a list of
    ``{"raw": caption}`` objects."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{name}: {path}: images[{index}] is not a Karpathy image record: {what}")

    if not isinstance(record, dict):
        raise bad(f"expected an object, got {type(record).__name__}")
    for key in ("filename", "filepath", "split"):
        if (key in record or key == "filename") and not isinstance(record.get(key), str):
            raise bad(f"{key!r} must be a string, got {type(record.get(key)).__name__}")
    sentences = record.get("sentences", [])
    if not isinstance(sentences, list):
        raise bad(f"'sentences' must be a list of {{\"raw\": caption}} objects, got "
                  f"{type(sentences).__name__}")
    for j, sentence in enumerate(sentences):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("raw", ""), str):
            raise bad(f"sentences[{j}] must be an object whose 'raw' is the caption string, got "
                      f"{sentence!r:.80}")


def _image_dir(name: str, root: Path, records: list[dict], probe: int = 20) -> Path:
    """The folder the records' ``filepath/filename`` resolve under: the first candidate holding any of
    the first ``probe`` records' images. None of them anywhere is a layout error, not missing images."""
    candidates = [root / c for c in IMAGE_FOLDERS[name]]
    rels = [Path(r.get("filepath", "")) / r["filename"] for r in records[:probe]]
    for c in candidates:
        if any((c / rel).is_file() for rel in rels):
            return c
    expected = candidates[0] / rels[0] if rels else candidates[0]
    raise SuiteLayoutError(name, expected, LAYOUTS[name],
                           f"none of the first {len(rels)} test images is under "
                           f"{[str(c) for c in candidates]}")


def _blip_records(name: str, path: Path) -> list[dict]:
    """BLIP's test-split list as Karpathy records (split "test", ``sentences[].raw``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = []
        for r in data:
            captions = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            records.append({"filename": r["image"], "split": "test",
                            "sentences": [{"raw": str(c)} for c in captions]})
        return records
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SuiteLayoutError(name, path, LAYOUTS[name], f"not a BLIP test-split file: {exc}") from exc
