"""LLM2CLIP's precomputed caption embeddings (``*_text_embeddings.tar``), read for import into our cache.

microsoft/LLM2CLIP ``llm2clip/data/extract_embedding.py`` (commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a)
writes, for every data shard ``X.tar``, a WebDataset tar ``X_text_embeddings.tar`` beside it
(``tar_path.replace(".tar", "_text_embeddings.tar")``) holding one sample per data sample: ``__key__``
the data sample's key and, for each caption key (``shortSV_captions``, ``longSV_captions``), the raw
bytes of its float32 embedding (``embeddings[k][i].numpy().tobytes()``; ``training/data.py`` reads them
back with ``np.frombuffer(..., dtype=np.float32)``). There is no caption text in them.

:func:`embedding_tar_for` finds a data shard's tar, :func:`read_embedding_tar` indexes one (member
headers only; caption names keep their letter case, which WebDataset would lower) and
:meth:`EmbeddingTar.vector` reads one embedding.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUFFIX = "_text_embeddings.tar"


def embedding_tar_for(data_shard: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """The ``*_text_embeddings.tar`` of ``data_shard``: beside it (the official layout) or, with
    ``folder``, of the same name in ``folder``."""
    shard = Path(data_shard)
    name = shard.name[: -len(".tar")] + SUFFIX if shard.name.endswith(".tar") else shard.name + SUFFIX
    return (Path(folder) if folder is not None else shard.parent) / name


@dataclass
class EmbeddingTar:
    """One indexed ``*_text_embeddings.tar``: per key, per caption name, (data offset, size)."""

    path: Path
    members: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    @property
    def caption_names(self) -> list[str]:
        names: dict[str, None] = {}
        for per_key in self.members.values():
            names.update(dict.fromkeys(per_key))
        return list(names)

    def vector(self, key: str, name: str) -> np.ndarray:
        """The float32 embedding of ``key``'s caption ``name`` (KeyError naming what is missing)."""
        if key not in self.members:
            raise KeyError(f"{self.path} holds no embedding for key {key!r}")
        where = self.members[key].get(name)
        if where is None:
            raise KeyError(f"{self.path}: key {key!r} has no {name!r} embedding (it has "
                           f"{sorted(self.members[key])})")
        offset, size = where
        if size % 4:
            raise ValueError(f"{self.path}: {key}.{name} holds {size} bytes, not a whole number of float32")
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{self.path}: {key}.{name} is truncated ({len(data)} of {size} bytes)")
        return np.frombuffer(data, dtype=np.float32).copy()


def read_embedding_tar(path: str | os.PathLike) -> EmbeddingTar:
    """Index the tar at ``path`` (headers only). Members are ``KEY.NAME`` (WebDataset's split at the
    first dot of the file name); a directory-less tar as ``wds.TarWriter`` writes it."""
    result = EmbeddingTar(Path(path))
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    continue
                folder = os.path.dirname(member.name)
                stem, name = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                result.members.setdefault(key, {})[name] = (member.offset_data, member.size)
    except tarfile.ReadError as exc:
        raise ValueError(f"{path} is not a readable uncompressed tar file: {exc}") from None
    return result
