"""Embedding cache: order, exact resume after a kill, corruption detection, rank sharding; and integrity
of its keys (a tampered keys file, changed keys on resume and duplicate keys are caught: each would
otherwise pair embeddings with the wrong captions without any error). The embed command itself:
test_embed_command.py; int8 storage: test_embedding_cache_int8.py."""

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

DIM = 6
NAMES = ["short", "long"]


def _records(n):
    return [(f"img{i:03d}", {"short": f"short caption {i}",
                             "long": f"a much longer caption number {i} " * (i % 4 + 1)})
            for i in range(n)]


def _fake_encode(texts):
    """Deterministic text -> vector, so any run gives bit-identical shards."""
    rows = []
    for t in texts:
        g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
        rows.append(torch.randn(DIM, generator=g))
    return torch.stack(rows)


def _build(out, records, **kw):
    kw.setdefault("shard_size", 4)
    return build_embedding_cache(iter(records), _fake_encode, out, caption_names=NAMES, dim=DIM, **kw)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_order_and_lookup(tmp_path):
    records = _records(11)
    _build(tmp_path / "c", records, dtype="float32")
    cache = EmbeddingCache.open(tmp_path / "c")
    assert cache.keys() == [k for k, _ in records] and len(cache) == 11
    assert cache.dim == DIM and cache.dtype == torch.float32 and cache.caption_names == NAMES
    assert "img004" in cache and "nope" not in cache
    keys = ["img010", "img000", "img005"]
    want = _fake_encode([dict(records)[k]["long"] for k in keys])
    torch.testing.assert_close(cache.lookup(keys, "long"), want)
    got = cache.get("img007")
    torch.testing.assert_close(got["short"], _fake_encode(["short caption 7"])[0])
    with pytest.raises(KeyError, match=r"2 key\(s\) not in the embedding cache.*'x1', 'x2'"):
        cache.lookup(["img001", "x1", "x2"], "short")
    with pytest.raises(KeyError, match="caption 'medium' is not in the cache"):
        cache.lookup(["img001"], "medium")
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert [s["records"] for s in manifest["shards"]] == [4, 4, 3]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_kill_and_resume_gives_identical_cache(tmp_path):
    records = _records(10)
    _build(tmp_path / "ref", records)

    class Killed(Exception):
        pass

    def kill_at_shard_1(event, shard):
        if event == "encoded" and shard == 1:
            raise Killed

    with pytest.raises(Killed):
        _build(tmp_path / "run", records, hook=kill_at_shard_1)
    run = tmp_path / "run"
    assert not (run / MANIFEST_NAME).exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        EmbeddingCache.open(run)
    # What a kill in the middle of writing leaves: a truncated temp file and a data file of shard 2
    # without its done record.
    (run / ".shard-00001.npy.abc.tmp").write_bytes(b"\x93NUMPY truncated")
    (run / "shard-00002.npy").write_bytes(b"garbage from an interrupted run")
    events = []
    _build(run, records, hook=lambda e, s: events.append((e, s)))
    assert ("skipped", 0) in events and ("written", 1) in events and ("written", 2) in events
    assert ("written", 0) not in events
    assert _files(run) == _files(tmp_path / "ref")
    cache = EmbeddingCache.open(run)
    assert cache.keys() == [k for k, _ in records]


def test_corrupt_or_truncated_shard_is_detected(tmp_path):
    _build(tmp_path / "c", _records(9))
    shard = tmp_path / "c" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.npy is corrupt"):
        EmbeddingCache.open(tmp_path / "c")
    shard.write_bytes(bytes(data[:-20]))
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.npy"):
        EmbeddingCache.open(tmp_path / "c", verify="size")
    # A resumed run redoes the damaged shard and the cache opens again.
    _build(tmp_path / "c", _records(9))
    assert len(EmbeddingCache.open(tmp_path / "c")) == 9


def test_ranks_split_shards_and_rank0_merges(tmp_path):
    records = _records(10)
    _build(tmp_path / "ref", records)
    out = tmp_path / "dist"
    written = {0: [], 1: []}
    # Rank 1 runs first (its barrier is a no-op here); rank 0 then merges every shard.
    assert _build(out, records, rank=1, world_size=2, hook=lambda e, s: written[1].append(s)) is None
    _build(out, records, rank=0, world_size=2, hook=lambda e, s: written[0].append(s))
    assert set(written[0]) == {0, 2} and set(written[1]) == {1}
    assert _files(out) == _files(tmp_path / "ref")


def test_changed_settings_or_bad_records_are_refused(tmp_path):
    _build(tmp_path / "c", _records(5))
    with pytest.raises(ValueError, match="different settings \\(dtype"):
        _build(tmp_path / "c", _records(5), dtype="float32")
    with pytest.raises(ValueError, match="duplicate key 'img000'"):
        _build(tmp_path / "d", _records(3) + _records(1))
    with pytest.raises(ValueError, match="lacks caption"):
        _build(tmp_path / "e", [("k", {"short": "x"})])


def test_float16_overflow_is_refused(tmp_path):
    with pytest.raises(ValueError, match="overflow float16"):
        build_embedding_cache(iter(_records(2)), lambda t: torch.full((len(t), DIM), 1e6), tmp_path / "o",
                              caption_names=NAMES, dim=DIM)


# ---- keys integrity ------------------------------------------------------------------------------------


KEYED_DIM = 4


def _keyed_records(keys):
    return [(k, {"short": f"short {k}", "long": f"long {k}"}) for k in keys]


def _keyed_encode(texts):
    rows = [torch.randn(KEYED_DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
            for t in texts]
    return torch.stack(rows)


def _build_keyed(out, keys, **kw):
    return build_embedding_cache(iter(_keyed_records(keys)), _keyed_encode, out, caption_names=NAMES,
                                 dim=KEYED_DIM, dtype="float32", shard_size=3, **kw)


KEYS = [f"k{i}" for i in range(8)]  # shards of 3, 3, 2


def test_swapped_keys_in_a_keys_file_fail_the_checksum_on_open(tmp_path):
    _build_keyed(tmp_path, KEYS)
    keys_file = tmp_path / "shard-00001.keys.json"
    swapped = json.loads(keys_file.read_text())
    swapped[0], swapped[1] = swapped[1], swapped[0]
    keys_file.write_text(json.dumps(swapped))  # still valid, same length: only the checksum can tell
    with pytest.raises(CacheCorruptError, match=r"keys file .*shard-00001\.keys\.json is corrupt"):
        EmbeddingCache.open(tmp_path)


def test_resume_redoes_a_shard_whose_keys_changed(tmp_path):
    _build_keyed(tmp_path, KEYS)
    renamed = list(KEYS)
    renamed[4] = "new4"  # shard 1 keeps its size; only its keys differ
    events = []
    _build_keyed(tmp_path, renamed, hook=lambda e, s: events.append((e, s)))
    assert sorted(events) == sorted([("skipped", 0), ("encoded", 1), ("written", 1), ("skipped", 2)])
    cache = EmbeddingCache.open(tmp_path)
    assert cache.keys() == renamed and "k4" not in cache
    torch.testing.assert_close(cache.lookup(["new4"], "long"), _keyed_encode(["long new4"]), rtol=0, atol=0)


def test_duplicate_keys_are_refused_when_building(tmp_path):
    with pytest.raises(ValueError, match="duplicate key 'k1'"):
        _build_keyed(tmp_path, ["k0", "k1", "k2", "k3", "k1"])  # the repeat lands in another shard


def test_duplicate_keys_across_shards_are_refused_on_open(tmp_path):
    _build_keyed(tmp_path, KEYS)
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
