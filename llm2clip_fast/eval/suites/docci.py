"""DOCCI long-description retrieval: ``docci_descriptions.jsonlines``, the ``test`` split, ``images/``."""

from __future__ import annotations

import json
from pathlib import Path

from .suite_data import RetrievalSuite, SuiteLayoutError

DESCRIPTIONS = "docci_descriptions.jsonlines"
LAYOUT = (f"  ROOT/{DESCRIPTIONS}   one JSON record a line: example_id, split, image_file, description\n"
          "  ROOT/images/<image_file>           the images")


def read_docci(root: str | Path, split: str = "test") -> RetrievalSuite:
    root = Path(root)
    path = root / DESCRIPTIONS
    if not path.is_file():
        raise SuiteLayoutError("docci", path, LAYOUT)
    if not (root / "images").is_dir():
        raise SuiteLayoutError("docci", root / "images", LAYOUT)
    images, ids, captions, skipped = [], [], [], {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record["split"] != split:
                    continue
                image_file, text = record["image_file"], str(record["description"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                detail = f"line {line_no} is not a DOCCI record: {exc}"
                raise SuiteLayoutError("docci", path, LAYOUT, detail) from exc
            key = str(record.get("example_id", image_file))
            if not text:
                skipped[key] = "empty description"
                continue
            images.append(root / "images" / image_file)
            ids.append(f"images/{image_file}")
            captions.append(text)
    if not images:
        raise SuiteLayoutError("docci", path, LAYOUT, f"no records with split {split!r}")
    return RetrievalSuite("docci", root, images, ids, captions, list(range(len(images))), skipped)
