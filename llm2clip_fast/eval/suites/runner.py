"""Run suites on one embedder: metrics, one JSON per suite, a CSV row per suite and run, one table.

Retrieval suites report image->text and text->image recall@1/5/10 (``retrieval_metrics``: an image
is a hit at K when any of its captions is in its top K; every caption is a text->image query).
Classification suites report top-1/top-5 accuracy, each class embedded as the normalised mean of its
normalised template embeddings. Images that are missing or cannot be decoded are left out with their
captions and reported (``missing``); past ``max_missing_fraction`` of a suite's images the run stops
(``BadDataError``), since the numbers would no longer be comparable with anyone's.
"""

from __future__ import annotations

import csv
import datetime
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llm2clip_fast.data.bad_data import BadDataError
from llm2clip_fast.eval.retrieval_metrics import multi_caption_retrieval, topk_accuracy

from .embedding import SuiteEmbedder, embed_images, embed_texts
from .registry import Suite
from .suite_data import ClassificationSuite

logger = logging.getLogger(__name__)

RETRIEVAL_KS = (1, 5, 10)
CLASSIFICATION_KS = (1, 5)
CSV_COLUMNS = ("time", "model", "suite", "n_images", "n_texts", "n_missing",
               *(f"i2t_R@{k}" for k in RETRIEVAL_KS), *(f"t2i_R@{k}" for k in RETRIEVAL_KS),
               *(f"top{k}" for k in CLASSIFICATION_KS), "seconds", "cached")
MAX_LISTED = 50


def _log(message: str) -> None:
    logger.info("[eval] %s", message)


def evaluate_suite(embedder: SuiteEmbedder, suite: Suite, *, batch_size: int = 64, workers: int = 0,
                   cache_dir: str | os.PathLike[str] | None = None, max_missing_fraction: float = 0.01,
                   progress: bool = True) -> dict[str, Any]:
    """Every metric of one suite. Fractions in [0, 1]; see the module docstring."""
    if not 0 <= max_missing_fraction <= 1:
        raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")
    start = time.perf_counter()
    image_emb, kept, missing, images_cached = embed_images(
        embedder, suite.images, suite.image_ids, batch_size=batch_size, workers=workers, cache_dir=cache_dir,
        tag=suite.name, progress=progress)
    n_listed = len(suite.images)
    if missing:
        shown = ", ".join(f"{k} ({v})" for k, v in list(missing.items())[:5])
        _log(f"{suite.name}: {len(missing)} of {n_listed} images missing or undecodable, left out: {shown}"
             + (" ..." if len(missing) > 5 else ""))
    if image_emb is None or len(missing) > max_missing_fraction * n_listed:
        raise BadDataError(f"{suite.name}: {len(missing)} of {n_listed} images are missing or undecodable "
                           f"(more than --max-missing-fraction {max_missing_fraction}); first: "
                           f"{dict(list(missing.items())[:5])}")
    result: dict[str, Any] = {"suite": suite.name, "kind": suite.kind, "root": str(suite.root),
                              "n_images_listed": n_listed, "n_missing": len(missing),
                              "missing": dict(list(missing.items())[:MAX_LISTED]),
                              "n_skipped": len(suite.skipped),
                              "skipped": dict(list(suite.skipped.items())[:MAX_LISTED])}
    if isinstance(suite, ClassificationSuite):
        prompts = suite.prompts
        text_emb, texts_cached = embed_texts(embedder, prompts, batch_size=batch_size, cache_dir=cache_dir,
                                             tag=suite.name, progress=progress)
        n_classes, n_templates = len(suite.class_names), len(suite.templates)
        per_prompt = F.normalize(text_emb, dim=-1).view(n_classes, n_templates, -1)
        class_emb = F.normalize(per_prompt.mean(dim=1), dim=-1)
        labels = torch.tensor([suite.labels[i] for i in kept], dtype=torch.long)
        top = topk_accuracy(image_emb, class_emb, labels, CLASSIFICATION_KS)
        result.update({f"top{k}": v for k, v in top.items()})
        result.update({"n_images": len(kept), "n_texts": len(prompts), "n_classes": n_classes,
                       "n_templates": n_templates})
    else:
        kept_set = {old: new for new, old in enumerate(kept)}
        caption_rows = [j for j, img in enumerate(suite.caption_image) if img in kept_set]
        texts = [suite.captions[j] for j in caption_rows]
        text_emb, texts_cached = embed_texts(embedder, texts, batch_size=batch_size, cache_dir=cache_dir,
                                             tag=suite.name, progress=progress)
        owner = torch.tensor([kept_set[suite.caption_image[j]] for j in caption_rows], dtype=torch.long)
        result.update(multi_caption_retrieval(image_emb, text_emb, owner, RETRIEVAL_KS))
        result.update({"n_images": len(kept), "n_texts": len(texts)})
    result["cached"] = {"images": images_cached, "texts": texts_cached}
    result["seconds"] = time.perf_counter() - start
    return result


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_suite_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per suite: recalls (or top-1/5) in percent, counts, seconds."""
    cols = ([f"i2t R@{k}" for k in RETRIEVAL_KS] + [f"t2i R@{k}" for k in RETRIEVAL_KS]
            + [f"top-{k}" for k in CLASSIFICATION_KS] + ["images", "texts", "missing", "seconds"])
    keys = ([f"i2t_R@{k}" for k in RETRIEVAL_KS] + [f"t2i_R@{k}" for k in RETRIEVAL_KS]
            + [f"top{k}" for k in CLASSIFICATION_KS])
    name_w = max(13, *(len(r["suite"]) for r in results))
    widths = [max(6, len(c)) for c in cols]
    lines = ["  ".join(["suite".ljust(name_w), *(c.rjust(w) for c, w in zip(cols, widths))])]
    for r in results:
        cached = " (cached)" if all(r.get("cached", {}).values()) else ""
        cells = [_pct(r.get(k)) for k in keys] + [str(r["n_images"]), str(r["n_texts"]), str(r["n_missing"]),
                                                   f"{r['seconds']:.1f}{cached}"]
        lines.append("  ".join([r["suite"].ljust(name_w), *(c.rjust(w) for c, w in zip(cells, widths))]))
    return "\n".join(lines)


def append_csv(path: str | os.PathLike[str], model: str, results: Sequence[dict[str, Any]]) -> Path:
    """Append one row per suite result to ``path`` (header written when the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for r in results:
            row = {c: r.get(c, "") for c in CSV_COLUMNS}
            row.update({"time": now, "model": model, "cached": int(all(r.get("cached", {}).values())),
                        "seconds": f"{r['seconds']:.3f}"})
            writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())
    return path
