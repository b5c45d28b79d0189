"""ShareGPT4V-1k long-caption retrieval: the first 1,000 records of the ShareGPT4V caption JSON.

Long-CLIP and LLM2CLIP evaluate on the first 1,000 records of
``share-captioner_coco_lcs_sam_1246k_1107.json``, the caption being the assistant's turn of
``conversations`` and the image ``ROOT/<image>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .suite_data import RetrievalSuite, SuiteLayoutError

CAPTION_FILES = ("share-captioner_coco_lcs_sam_1246k_1107.json", "sharegpt4v_1k.json")
LAYOUT = (f"  ROOT/{CAPTION_FILES[0]}   (or ROOT/{CAPTION_FILES[1]}) a JSON list of records\n"
          "      {\"image\": \"coco/train2017/000000000009.jpg\", \"conversations\": "
          "[{\"from\": \"human\", ...}, {\"from\": \"gpt\", \"value\": CAPTION}]}\n"
          "  ROOT/<image>    the images, at the record's relative path")
N_RECORDS = 1000
ASSISTANT = ("gpt", "assistant")


def read_sharegpt4v(root: str | Path, n_records: int | None = None) -> RetrievalSuite:
    """The first ``n_records`` (default :data:`N_RECORDS`) records with an image and a caption."""
    n_records = N_RECORDS if n_records is None else n_records
    root = Path(root)
    path = next((root / f for f in CAPTION_FILES if (root / f).is_file()), None)
    if path is None:
        raise SuiteLayoutError("sharegpt4v-1k", root / CAPTION_FILES[0], LAYOUT)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise TypeError(f"the top level is a {type(records).__name__}, not a list")
    except (json.JSONDecodeError, TypeError) as exc:
        detail = f"not a ShareGPT4V caption file: {exc}"
        raise SuiteLayoutError("sharegpt4v-1k", path, LAYOUT, detail) from exc
    images, ids, captions, skipped = [], [], [], {}
    for i, record in enumerate(records[:n_records]):
        try:
            image = record["image"]
            turns = [t for t in record["conversations"] if t.get("from") in ASSISTANT]
        except (KeyError, TypeError, AttributeError) as exc:
            raise SuiteLayoutError("sharegpt4v-1k", path, LAYOUT, f"record {i} lacks {exc}") from exc
        text = str(turns[0].get("value", "")).strip() if turns else ""
        if not text:
            skipped[str(image)] = "no assistant caption"
            continue
        images.append(root / image)
        ids.append(str(image))
        captions.append(text)
    if not images:
        raise SuiteLayoutError("sharegpt4v-1k", path, LAYOUT, "no records with an image and a caption")
    return RetrievalSuite("sharegpt4v-1k", root, images, ids, captions, list(range(len(images))), skipped)
