"""Embedding-cache integrity: a tampered keys file, changed keys on resume and duplicate keys are caught.

Each of these would otherwise pair embeddings with the wrong captions without any error.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import pytest
import torch

from llm2clip_fast.data.embedding_cache import (
    MANIFEST_NAME,
    CacheCorruptError,
    EmbeddingCache,
    build_embedding_cache,
)

DIM = 4
NAMES = ["short", "long"]


def _records(keys):
    return [(k, {"short": f"short {k}", "long": f"long {k}"}) for k in keys]


def _encode(texts):
    rows = [torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.stack(rows)


def _build(out, keys, **kw):
    return build_embedding_cache(iter(_records(keys)), _encode, out, caption_names=NAMES, dim=DIM,
                                 dtype="float32", shard_size=3, **kw)


KEYS = [f"k{i}" for i in range(8)]  # shards of 3, 3, 2


def test_swapped_keys_in_a_keys_file_fail_the_checksum_on_open(tmp_path):
    _build(tmp_path, KEYS)
    keys_file = tmp_path / "shard-00001.keys.json"
    swapped = json.loads(keys_file.read_text())
    swapped[0], swapped[1] = swapped[1], swapped[0]
    keys_file.write_text(json.dumps(swapped))  # still valid, same length: only the checksum can tell
    with pytest.raises(CacheCorruptError, match=r"keys file .*shard-00001\.keys\.json is corrupt"):
        EmbeddingCache.open(tmp_path)


def test_resume_redoes_a_shard_whose_keys_changed(tmp_path):
    _build(tmp_path, KEYS)
    renamed = list(KEYS)
    renamed[4] = "new4"  # shard 1 keeps its size; only its keys differ
    events = []
    _build(tmp_path, renamed, hook=lambda e, s: events.append((e, s)))
    assert sorted(events) == sorted([("skipped", 0), ("encoded", 1), ("written", 1), ("skipped", 2)])
    cache = EmbeddingCache.open(tmp_path)
    assert cache.keys() == renamed and "k4" not in cache
    torch.testing.assert_close(cache.lookup(["new4"], "long"), _encode(["long new4"]), rtol=0, atol=0)


def test_duplicate_keys_are_refused_when_building(tmp_path):
    with pytest.raises(ValueError, match="duplicate key 'k1'"):
        _build(tmp_path, ["k0", "k1", "k2", "k3", "k1"])  # the repeat lands in another shard


def test_duplicate_keys_across_shards_are_refused_on_open(tmp_path):
    _build(tmp_path, KEYS)
    # A cache whose keys file repeats a key of another shard, with every checksum made consistent,
    # as a buggy writer or a hand-merged cache would leave it.
    keys_file = tmp_path / "shard-00001.keys.json"
    payload = json.dumps(["k3", "k0", "k5"]).encode()
    keys_file.write_bytes(payload)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["shards"][1]["keys_file_sha256"] = hashlib.sha256(payload).hexdigest()
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match=r"key 'k0' appears twice"):
        EmbeddingCache.open(tmp_path)
