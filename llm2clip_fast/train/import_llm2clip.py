"""``embed --import-llm2clip``: LLM2CLIP's precomputed caption embeddings as our checksummed cache.

Users of microsoft/LLM2CLIP have its ``*_text_embeddings.tar`` files (one per data shard, see
:mod:`llm2clip_fast.data.llm2clip_embeddings`): the official extraction's vectors (the released
``LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned`` through llm2vec, mean pooling, ``max_length`` and
``doc_max_length`` 512, the Llama-3 template). Importing them skips the LLM altogether.

With ``--data SHARDS`` (the data shards the tars were extracted from) every data sample's vectors are
read from its shard's tar (beside the shard, or in the ``--import-llm2clip`` folder), the cache's
columns are the data's caption names (``shortSV_captions`` and ``longSV_captions``, matched to the
tar's members whatever their letter case) and its caption hashes are the data's own texts, so stage 2
checks the cache against the data as it checks an ``embed`` cache. A data sample whose vector is
missing is an error naming the key and the tar. Without ``--data`` the tars alone give keys and
vectors but no caption texts: that is refused unless ``--trust-embedding-keys``, which is recorded in
the cache (``captions_unverified``) and makes stage 2 warn instead of checking captions.

The cache records the official encoder as its own (``model``: the released LLM, or ``--llm`` where it
is on this machine, whose files' hashes are then recorded for eval's check; the official encoding
settings), so eval embeds new captions the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.bad_data import BadDataTracker
from ..data.embedding_cache import build_embedding_cache, storage_dtype_name
from ..data.llm2clip_embeddings import SUFFIX, EmbeddingTar, embedding_tar_for, read_embedding_tar
from ..redaction import redact

logger = logging.getLogger(__name__)

OFFICIAL_LLM = "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"
# llm2clip/data/extract_embedding.py: LLM2Vec(llm_model, tokenizer, pooling_mode="mean", max_length=512,
# doc_max_length=512) on the released LLM in bfloat16, _name_or_path forced to Meta-Llama-3-8B-Instruct.
OFFICIAL_ENCODING = {"lora": None, "load_in_8bit": False, "model_dtype": "bf16", "pooling": "mean",
                     "instruction": None, "max_length": 512, "normalize": False, "bidirectional": True,
                     "template": "llama3", "doc_max_length": 512}
BESIDE = "beside"  # --import-llm2clip without a folder: each tar beside its data shard


def _data_shards(source: Any) -> list[str]:
    """Every data shard of a WebDataset source or a mix of them, in order."""
    parts = getattr(source, "parts", None)
    if parts is not None:
        return [s for part in parts for s in _data_shards(part)]
    return list(getattr(source, "shards", []))


def _sample_location(source: Any, index: int) -> tuple[str, str]:
    """(the data shard's path, the sample's key in it) of a WebDataset source or a mix of them."""
    parts = getattr(source, "parts", None)
    if parts is not None:  # a ';' mix (data.mixed_source): find the part, keep its key unprefixed
        part, i = source._locate(index)
        return _sample_location(parts[part], i)
    shards = getattr(source, "shards", None)
    if shards is None or not hasattr(source, "index"):
        raise ValueError(f"--import-llm2clip reads each data shard's *{SUFFIX}: --data must be local "
                         f"WebDataset shards (the ones the embeddings were extracted from), got "
                         f"{source.describe()}")
    sample = source.index[index]
    return shards[sample.shard], sample.key


class _TarCache:
    """The embedding tars read so far (one at a time is enough: samples come shard by shard)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = None if folder in (None, BESIDE) else folder
        self.current: EmbeddingTar | None = None
        self.seen: list[str] = []

    def tar_for(self, data_shard: str) -> EmbeddingTar:
        path = embedding_tar_for(data_shard, self.folder)
        if self.current is None or self.current.path != path:
            if not path.is_file():
                raise FileNotFoundError(f"--import-llm2clip: no {path.name} for the data shard {data_shard} "
                                        f"(looked for {path})")
            self.current = read_embedding_tar(path)
            self.seen.append(str(path))
        return self.current


def _column_names(data_names: list[str], tar_names: list[str], tar: Path) -> dict[str, str]:
    """``{data caption name: tar member name}`` for the captions both have (letter case ignored)."""
    by_lower = {n.lower(): n for n in tar_names}
    columns = {d: by_lower[d.lower()] for d in data_names if d.lower() in by_lower}
    if not columns:
        raise ValueError(f"{tar} holds embeddings for {tar_names}, none of the data's captions "
                         f"{data_names}")
    return columns


def import_llm2clip_embeddings(*, out: str | Path, data: str | None, folder: str | None,
                               trust_keys: bool = False, llm: str | None = None, dtype: str = "fp16",
                               shard_size: int = 10_000, max_bad_fraction: float = 0.01,
                               progress: bool = True) -> Path:
    """Build the cache in ``out`` from LLM2CLIP's embedding tars (see the module docstring); returns the
    manifest path."""
    storage = storage_dtype_name(dtype)
    if data is None and not trust_keys:
        raise ValueError("--import-llm2clip without --data: the embedding tars hold no caption text, so the "
                         "cache could not be checked against the data stage 2 trains on. Pass the data "
                         "shards they were extracted from with --data, or --trust-embedding-keys to import "
                         "the keys as they are (recorded in the cache; stage 2 then cannot check captions)")
    if data is None and folder in (None, BESIDE):
        raise ValueError("--import-llm2clip needs the folder of the *_text_embeddings.tar files when --data "
                         "is not given")
    records, columns, dim, tars = (_records_from_data(data, folder, max_bad_fraction) if data is not None
                                   else _records_from_tars(Path(folder)))
    metadata = {"model": llm or OFFICIAL_LLM, **OFFICIAL_ENCODING,
                "source": redact(str(data if data is not None else folder)),
                "imported_from": "LLM2CLIP *_text_embeddings.tar (llm2clip/data/extract_embedding.py)",
                "captions_unverified": data is None}
    from ..models.llm_fingerprint import llm_weights_fingerprint

    try:
        weights = llm_weights_fingerprint(llm) if llm else {}
    except FileNotFoundError:
        weights = {}
    settings = {k: metadata[k] for k in OFFICIAL_ENCODING}
    # what makes the vectors: the tars (by name and size: hashing tens of GB of them would cost more than
    # the import), the encoder they came from
    sized = [[Path(t).name, Path(t).stat().st_size if Path(t).is_file() else None] for t in tars]
    fingerprint = {"weights": weights, "settings": settings, "imported": {"tars": sized}}
    pending: dict[str, np.ndarray] = {}
    order: list[str] = []

    def counted(rows: Iterator[tuple[str, dict[str, str], np.ndarray]]
                ) -> Iterator[tuple[str, dict[str, str]]]:
        for n, (key, captions, vectors) in enumerate(rows):
            if n % shard_size == 0:  # a new shard: the previous one was encoded or reused already
                pending.clear()
                order.clear()
            pending[key] = vectors
            order.append(key)
            yield key, captions

    def encode(texts: list[str]) -> torch.Tensor:
        n = len(texts) // len(columns)
        return torch.from_numpy(np.stack([pending[k] for k in order[-n:]]).reshape(len(texts), dim))

    manifest = build_embedding_cache(counted(records), encode, out, caption_names=list(columns), dim=dim,
                                     dtype=storage, shard_size=shard_size, metadata=metadata,
                                     fingerprint=fingerprint)
    if progress:
        logger.info("[embed] imported LLM2CLIP embeddings from %d tar(s) into %s", len(tars), manifest)
    return manifest


def _records_from_data(data: str, folder: str | None, max_bad_fraction: float):
    """(rows, {data name: tar name}, dim, tars read): rows are (key, data captions, (captions, dim))."""
    from ..data.sources import open_source

    source = open_source(data, require_images=False)
    tars = _TarCache(folder)
    first_path, _ = _sample_location(source, 0)
    first = tars.tar_for(first_path)
    columns = _column_names(list(source.caption_names), first.caption_names, first.path)
    probe_key = _sample_location(source, 0)[1]
    dim = len(first.vector(probe_key, next(iter(columns.values()))))
    bad = BadDataTracker(max_bad_fraction)
    expected = [str(embedding_tar_for(shard, tars.folder)) for shard in _data_shards(source)]

    def rows() -> Iterator[tuple[str, dict[str, str], np.ndarray]]:
        for i, captions in source.iter_good(source.captions_at, bad):
            shard, raw_key = _sample_location(source, i)
            tar = tars.tar_for(shard)
            try:
                vectors = np.stack([tar.vector(raw_key, columns[name]) for name in columns])
            except KeyError as exc:
                raise ValueError(f"--import-llm2clip: {exc.args[0]} (data sample {source.key_at(i)!r} of "
                                 f"{shard})") from None
            if vectors.shape[1] != dim:
                raise ValueError(f"{tar.path}: {raw_key} has {vectors.shape[1]}-d embeddings, others {dim}-d")
            yield source.key_at(i), {name: captions[name] for name in columns}, vectors
        bad.check_end_of_epoch()

    return rows(), columns, dim, expected


def _records_from_tars(folder: Path):
    """(rows, {name: name}, dim, tars): the tars of ``folder`` alone, keys as they are, no caption text."""
    paths = sorted(folder.glob(f"*{SUFFIX}"))
    if not paths:
        raise FileNotFoundError(f"--import-llm2clip {folder}: no *{SUFFIX} files there")
    first = read_embedding_tar(paths[0])
    names = first.caption_names
    key0 = next(iter(first.members))
    dim = len(first.vector(key0, names[0]))

    def rows() -> Iterator[tuple[str, dict[str, str], np.ndarray]]:
        for path in paths:
            tar = first if path == paths[0] else read_embedding_tar(path)
            for key in tar.members:
                yield key, dict.fromkeys(names, ""), np.stack([tar.vector(key, n) for n in names])

    return rows(), {n: n for n in names}, dim, [str(p) for p in paths]
