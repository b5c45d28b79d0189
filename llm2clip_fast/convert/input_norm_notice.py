"""The loud notice for a converted LLM2CLIP release whose adapter input normalisation was assumed.

``convert --from llm2clip-hf`` without ``--input-norm`` takes ``l2`` (see
:mod:`llm2clip_fast.convert.llm2clip_hf`): right for the official training code, not verified against
the release's own remote modeling file. Both the conversion and every ``eval`` of the converted folder
say so, with the way to check it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("llm2clip_fast.convert")

CONVERSION_RECORD = "conversion.json"


def assumed_input_norm_notice(model_dir: str | os.PathLike[str], input_norm: str) -> str:
    """The notice text for a folder converted with the assumed ``input_norm``."""
    other = "none" if input_norm == "l2" else "l2"
    return (f"{model_dir}: the text adapter reads the LLM embedding with input_norm={input_norm!r}, the "
            "official training code's TextProj.forward(l2_norm=True); the release's own modeling file "
            "(modeling_llm2clip.py) could not be read to confirm it. Check it on your data: convert again "
            f"with --input-norm {other} and compare eval --suite flickr30k (the right setting scores higher)")


def warn_if_input_norm_assumed(model_dir: str | os.PathLike[str]) -> str | None:
    """Log (warning) and return the notice when ``model_dir`` is a conversion whose adapter input
    normalisation was assumed (its ``conversion.json`` says so); None otherwise."""
    record_file = Path(model_dir) / CONVERSION_RECORD
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    source = record.get("adapter_input_norm_from", "") if isinstance(record, dict) else ""
    assumed = str(source).startswith("default")
    if not assumed:
        return None
    notice = assumed_input_norm_notice(model_dir, str(record.get("adapter_input_norm", "l2")))
    logger.warning("%s", notice)
    return notice
