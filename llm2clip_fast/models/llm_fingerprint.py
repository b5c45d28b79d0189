"""Which LLM a model's adapter was trained on, by content: the SHA-256 of its weight, config and
tokenizer files (and of its LoRA adapters'), recorded with the model and checked before evaluating.

An adapter learns the embeddings of one LLM. Retraining that LLM in place (``stage1 --overwrite`` into
the same folder) after stage 2 leaves the folder's path unchanged and every embedding different, so the
path alone cannot tell; the files' hashes can. ``embed`` records them in the cache's manifest
(``encoder_fingerprint.weights``), stage 2 copies them into the model's ``config.llm.weights_sha256``,
``convert --llm`` records those of the folder it names, and eval compares them with the LLM it is about
to load (:func:`check_llm_unchanged`): a mismatch stops it (:class:`LLMChangedError`, exit code 6)
unless ``--allow-llm-change``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..data.embedding_cache import weights_fingerprint
from ..redaction import redact

logger = logging.getLogger(__name__)

RECORD_KEY = "weights_sha256"
_SHOWN = 4


class LLMChangedError(RuntimeError):
    """The LLM about to embed captions is not the one the model's adapter was trained on."""


def lora_folders(lora: str | None) -> list[str]:
    """The adapter folders of a ``lora`` option (``"A,B"``: merged in order), empty for None."""
    return [a.strip() for a in lora.split(",") if a.strip()] if lora else []


def llm_weights_fingerprint(llm: str | os.PathLike[str], lora: str | None = None) -> dict[str, str]:
    """``{"<i>/<relative path>": sha256}`` of every weight, config and tokenizer file of the LLM folder
    (``i`` 0) and its LoRA adapters (``i`` 1, 2, ...): what ``embed`` records for the cache."""
    from .llm_encoder import resolve_model_path

    return weights_fingerprint(resolve_model_path(llm), *lora_folders(lora))


def _difference(recorded: dict[str, str], now: dict[str, str]) -> str:
    changed = sorted(k for k in recorded if k in now and now[k] != recorded[k])
    missing = sorted(k for k in recorded if k not in now)
    added = sorted(k for k in now if k not in recorded)
    parts = []
    for label, names in (("changed", changed), ("missing", missing), ("new", added)):
        if names:
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            # "0/" is the LLM folder, "1/", "2/" ... its LoRA adapters.
            parts.append(f"{label}: {', '.join(names[:_SHOWN])}{more}")
    return "; ".join(parts)


def check_llm_unchanged(recorded: dict[str, Any] | None, llm: str | os.PathLike[str], *,
                        lora: str | None = None, allow_change: bool = False, flag: str = "--allow-llm-change",
                        ) -> None:
    """Compare the LLM at ``llm`` (with ``lora``) against the fingerprint the model recorded
    (``recorded``: its ``config.llm``). A mismatch raises :class:`LLMChangedError` naming the files that
    differ, or with ``allow_change`` logs it as a warning. A model that recorded no fingerprint (saved
    before fingerprints, or converted without a local ``--llm``) cannot be checked: a warning says so."""
    expected = (recorded or {}).get(RECORD_KEY)
    shown = redact(str(llm))
    if not isinstance(expected, dict) or not expected:
        logger.warning("the model records no fingerprint of its LLM (saved before fingerprints were "
                       "recorded, or converted without a local --llm): cannot check that %s is the LLM its "
                       "adapter was trained on", shown)
        return
    now = llm_weights_fingerprint(llm, lora)
    if now == expected:
        return
    problem = (f"the LLM {shown} is not the one the model's adapter was trained on (its files differ from "
               f"those recorded with the model: {_difference(expected, now)}; 0/ is the LLM folder, 1/, 2/ "
               "its LoRA adapters), so its caption embeddings are not the ones the adapter learned")
    if allow_change:
        logger.warning("%s; evaluating with it anyway (%s)", problem, flag)
        return
    raise LLMChangedError(f"{problem}. Point --llm at the original LLM, or pass {flag} to evaluate with this "
                          "one anyway")


__all__ = ["RECORD_KEY", "LLMChangedError", "check_llm_unchanged", "llm_weights_fingerprint", "lora_folders"]
