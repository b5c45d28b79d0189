"""The benchmarks LLM2CLIP reports, read from their downloaded layouts (``eval --suite NAME --root DIR``).

Retrieval: ``flickr30k`` and ``coco`` (Karpathy test split, every caption of an image), ``urban1k``,
``docci`` (test split), ``sharegpt4v-1k`` (first 1,000 records). Zero-shot classification: ``imagenet``
(val, 1,000 OpenAI class names x 80 templates) and ``classfolders`` (any class-per-folder set with a
class-name file). ``all`` runs every suite found under the root. One reader module per layout; the
runner embeds (cached), scores and writes results.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .embedding import ModelEmbedder, SuiteEmbedder, embed_images, embed_texts
from .registry import SUITES, Suite, find_suites, read_suite
from .runner import append_csv, evaluate_suite, format_suite_table
from .suite_data import ClassificationSuite, RetrievalSuite, SuiteLayoutError

logger = logging.getLogger(__name__)

__all__ = ["SUITES", "ClassificationSuite", "ModelEmbedder", "RetrievalSuite", "Suite", "SuiteEmbedder",
           "SuiteLayoutError", "append_csv", "embed_images", "embed_texts", "evaluate_suite", "find_suites",
           "format_suite_table", "read_suite", "run_suites"]


def run_suites(embedder: SuiteEmbedder, suite: str, root: str | os.PathLike[str], *,
               out: str | os.PathLike[str], model_name: str, classnames: str | None = None,
               templates: str | None = None,
               batch_size: int = 64, workers: int = 0, cache: bool = True, max_missing_fraction: float = 0.01,
               progress: bool = True) -> list[dict[str, Any]]:
    """Read suite ``suite`` (or ``"all"``) under ``root``, evaluate ``embedder`` on each, write
    ``out/<suite>.json`` (atomically), append to ``out/results.csv`` and return the results.

    Every suite is read (and its layout checked) before anything is embedded. Embeddings are cached
    under ``out/cache`` unless ``cache`` is False.
    """
    from ..results_files import write_json_atomic

    options = {"classnames": classnames, "templates": templates}
    if suite == "all":
        suites, absent = find_suites(root, **options)
        if absent:
            logger.warning("[eval] --suite all: not found under %s: %s", root, ", ".join(absent))
    else:
        suites = {suite: read_suite(suite, root, **options)}
    out = Path(out)
    cache_dir = out / "cache" if cache else None
    results = []
    for name, data in suites.items():
        logger.info("[eval] %s: %d images listed under %s", name, len(data.images), data.root)
        result = evaluate_suite(embedder, data, batch_size=batch_size, workers=workers, cache_dir=cache_dir,
                                max_missing_fraction=max_missing_fraction, progress=progress)
        result["model"] = model_name
        write_json_atomic(out / f"{name}.json", result)
        append_csv(out / "results.csv", model_name, [result])
        results.append(result)
    return results
