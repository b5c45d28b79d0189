"""Urban-1k long-caption retrieval: ``image/`` and ``caption/`` folders paired by file stem.

The caption is the first line of ``caption/<stem>.txt``, as LLM2CLIP's and Long-CLIP's evaluation
read it. A caption without an image, or an image without a caption, is reported and left out.
"""

from __future__ import annotations

from pathlib import Path

from .suite_data import RetrievalSuite, SuiteLayoutError, is_image_file

LAYOUT = ("  ROOT/image/<stem>.jpg      the images\n"
          "  ROOT/caption/<stem>.txt    one caption each (first line), paired with the image by stem")


def read_urban1k(root: str | Path) -> RetrievalSuite:
    root = Path(root)
    for sub in ("image", "caption"):
        if not (root / sub).is_dir():
            raise SuiteLayoutError("urban1k", root / sub, LAYOUT)
    image_by_stem = {p.stem: p for p in sorted((root / "image").iterdir()) if is_image_file(p)}
    images, ids, captions, skipped = [], [], [], {}
    caption_files = sorted((root / "caption").glob("*.txt"), key=_natural_key)
    if not caption_files:
        raise SuiteLayoutError("urban1k", root / "caption" / "<stem>.txt", LAYOUT, "no caption files")
    for path in caption_files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        text = lines[0].strip() if lines else ""
        if not text:
            skipped[f"caption/{path.name}"] = "empty caption"
            continue
        image = image_by_stem.pop(path.stem, None)
        # An absent image stays in the list so the embedding step reports it like any missing image.
        images.append(image if image is not None else root / "image" / f"{path.stem}.jpg")
        ids.append(f"image/{images[-1].name}")
        captions.append(text)
    for image in image_by_stem.values():
        skipped[f"image/{image.name}"] = "no caption file"
    return RetrievalSuite("urban1k", root, images, ids, captions, list(range(len(images))), skipped)


def _natural_key(path: Path) -> tuple:
    # 1.txt, 2.txt, ..., 10.txt: the dataset's own numbering order.
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)
