"""int8 embedding cache: round-trip accuracy, dequantised memory-mapped reads, checksums and resume,
the embed CLI with ``--dtype int8`` and stage 2 trained from an int8 cache."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm2clip_fast.data.embedding_cache import (
    MANIFEST_NAME,
    CacheCorruptError,
    EmbeddingCache,
    build_embedding_cache,
)
from llm2clip_fast.data.embedding_int8 import (
    QMAX,
    absmax_int8_roundtrip,
    dequantize_rows,
    dequantize_shard,
    quantize_shard,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.cache_throughput import llm_like_embeddings

DIM = 37
NAMES = ["short", "long"]


def _records(n):
    return [(f"img{i:03d}", {"short": f"short caption {i}", "long": f"a longer caption number {i}"})
            for i in range(n)]


def _encode(texts):
    """Deterministic text -> LLM-like vector (shared mean, one outlier dimension)."""
    rows = []
    for t in texts:
        g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
        rows.append(torch.randn(DIM, generator=g) * torch.linspace(0.2, 3.0, DIM) + 4.0)
    out = torch.stack(rows)
    out[:, 5] += 80.0
    return out


def _build(out, records, **kw):
    kw.setdefault("shard_size", 4)
    kw.setdefault("dtype", "int8")
    return build_embedding_cache(iter(records), _encode, out, caption_names=NAMES, dim=DIM, **kw)


def _cos(a, b):
    a, b = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (a, b))
    return F.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("records,captions,dim", [(1, 1, 5), (7, 2, 33), (301, 2, 130), (2100, 1, 9)])
def test_round_trip_error_is_within_half_a_step(records, captions, dim):
    x = llm_like_embeddings(records * captions, dim, seed=dim).reshape(records, captions, dim)
    q = quantize_shard(x)
    assert q.values.dtype == np.int8 and q.values.shape == x.shape
    assert q.row_scale.dtype == np.float32 and q.row_scale.shape == (records, captions)
    assert q.stats.dtype == np.float32 and q.stats.shape == (2, captions, dim)
    assert np.abs(q.values.astype(np.int32)).max() <= QMAX
    back = dequantize_shard(q)
    # Rounding to the grid: at most half a step per value (plus float32 arithmetic).
    step = q.row_scale[..., None] * q.stats[1]
    tol = 0.5 * step + 1e-5 * np.abs(x) + 1e-6
    assert (np.abs(back - x) <= tol).all()
    if records > 1:
        assert _cos(back, x).min() > 0.999
    else:  # one record is its own mean: stored exactly
        np.testing.assert_allclose(back, x, rtol=1e-6, atol=0)


def test_llm_like_vectors_meet_the_goal_and_beat_plain_absmax():
    x = llm_like_embeddings(512, 1024, seed=3)
    ours = dequantize_shard(quantize_shard(x[:, None, :]))[:, 0]
    plain = absmax_int8_roundtrip(x)
    ours_cos, plain_cos = _cos(ours, x), _cos(plain, x)
    assert ours_cos.mean() >= 0.999 and ours_cos.min() >= 0.999
    assert (1 - ours_cos).mean() < (1 - plain_cos).mean()
    # Relative to the mean the scheme keeps what tells rows apart; plain absmax loses it to the outliers.
    mu = x.mean(0)
    assert _cos(ours - mu, x - mu).mean() > 0.999 > _cos(plain - mu, x - mu).mean()


def test_constant_and_zero_rows_are_exact():
    x = np.zeros((3, 2, 8), dtype=np.float32)
    x[:, 1] = 2.5  # every record the same: equal to the mean, a zero residual
    back = dequantize_shard(quantize_shard(x))
    np.testing.assert_array_equal(back, x)
    got = dequantize_rows(np.zeros((2, 8), np.int8), np.zeros(2, np.float32), np.full(8, 1.5, np.float32),
                          np.ones(8, np.float32))
    np.testing.assert_array_equal(got, np.full((2, 8), 1.5, np.float32))


def test_int8_cache_reads_back_dequantised_through_the_memmap(tmp_path):
    records = _records(11)
    _build(tmp_path / "q", records)
    _build(tmp_path / "f", records, dtype="float32")
    q, f = EmbeddingCache.open(tmp_path / "q"), EmbeddingCache.open(tmp_path / "f")
    assert q.dtype == torch.int8 and q.keys() == f.keys() and q.dim == DIM
    manifest = json.loads((tmp_path / "q" / MANIFEST_NAME).read_text())
    assert manifest["version"] == 2 and manifest["dtype"] == "int8"
    assert json.loads((tmp_path / "f" / MANIFEST_NAME).read_text())["version"] == 1  # fp32 unchanged
    assert isinstance(q._arrays[0], np.memmap) and q._arrays[0].dtype == np.int8
    assert isinstance(q._int8[0][0], np.memmap)
    keys = ["img010", "img000", "img005", "img003"]
    for name in NAMES:
        got, want = q.lookup(keys, name), f.lookup(keys, name)
        assert got.dtype == torch.float32 and got.shape == (4, DIM)
        assert _cos(got, want).min() > 0.9999
        # Exactly the quantisation of the fp32 shard, read back row by row.
        shard = np.load(tmp_path / "f" / "shard-00000.npy")
        exact = dequantize_shard(quantize_shard(shard))
        col = NAMES.index(name)
        torch.testing.assert_close(q.lookup(["img003", "img001"], name),
                                   torch.from_numpy(exact[[3, 1], col]), rtol=1e-6, atol=1e-5)
    row = q.get("img007")
    for name in NAMES:
        torch.testing.assert_close(row[name], q.lookup(["img007"], name)[0], rtol=1e-6, atol=1e-6)
    # Fewer bytes: int8 values plus a float32 scale per row, next to 4 bytes per value.
    size = sum((tmp_path / "q" / s["file"]).stat().st_size for s in manifest["shards"])
    assert size < 0.4 * sum(p.stat().st_size for p in (tmp_path / "f").glob("shard-*[0-9].npy"))


@pytest.mark.parametrize("suffix", [".npy", ".scales.npy", ".stats.npy"])
def test_int8_shard_files_are_checksummed_and_resume_redoes_them(tmp_path, suffix):
    records = _records(9)
    _build(tmp_path / "ref", records)
    _build(tmp_path / "c", records)
    path = tmp_path / "c" / f"shard-00001{suffix}"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=rf"shard-00001{suffix.replace('.', '[.]')} is corrupt"):
        EmbeddingCache.open(tmp_path / "c")
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(CacheCorruptError, match=rf"shard-00001{suffix.replace('.', '[.]')}"):
        EmbeddingCache.open(tmp_path / "c", verify="size")
    events = []
    _build(tmp_path / "c", records, hook=lambda e, s: events.append((e, s)))
    assert ("written", 1) in events and ("written", 0) not in events
    assert (tmp_path / "c" / f"shard-00001{suffix}").read_bytes() == \
        (tmp_path / "ref" / f"shard-00001{suffix}").read_bytes()
    assert len(EmbeddingCache.open(tmp_path / "c")) == 9


def test_missing_int8_part_and_unknown_version_are_refused(tmp_path):
    _build(tmp_path / "c", _records(5))
    path = tmp_path / "c" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["shards"][0].pop("scales_file")
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="no scales file"):
        EmbeddingCache.open(tmp_path / "c", verify=False)
    manifest["version"] = 3
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="cache version 3, this reader reads versions 1, 2"):
        EmbeddingCache.open(tmp_path / "c")


def test_switching_an_existing_cache_to_int8_is_refused(tmp_path):
    _build(tmp_path / "c", _records(5), dtype="float16")
    with pytest.raises(ValueError, match=r"different settings \(dtype, version"):
        _build(tmp_path / "c", _records(5))


def test_non_finite_embeddings_are_refused_for_int8(tmp_path):
    with pytest.raises(ValueError, match="inf/nan"):
        build_embedding_cache(iter(_records(2)), lambda t: torch.full((len(t), DIM), float("nan")),
                              tmp_path / "o", caption_names=NAMES, dim=DIM, dtype="int8")


def test_embed_command_with_int8_storage(tmp_path):
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder, packaged_minilm_path
    from llm2clip_fast.train.__main__ import main

    records = _records(7)
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"key": k, "image": f"{k}.png", **c}) + "\n" for k, c in records))
    out = tmp_path / "cache"
    argv = ["embed", "--llm", str(packaged_minilm_path()), "--data", str(manifest), "--out", str(out),
            "--dtype", "int8", "--batch-size", "4", "--shard-size", "3", "--quiet"]
    assert main(argv) == 0
    cache = EmbeddingCache.open(out)
    assert cache.dtype == torch.int8 and cache.keys() == [k for k, _ in records]
    assert np.load(out / "shard-00000.npy", mmap_mode="r").dtype == np.int8
    enc = LLMTextEncoder.from_pretrained(packaged_minilm_path(), device="cpu")
    for name in NAMES:
        want = enc.encode([c[name] for _, c in records], show_progress=False)
        assert _cos(cache.lookup(cache.keys(), name), want).min() > 0.999
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(argv) == 0  # finished: every shard reused, nothing rewritten
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_stage2_trains_from_an_int8_cache(tmp_path):
    from _stage2_runs import bag_of_words, logged_losses, make_demo, stage2_args

    from llm2clip_fast.data.sources import open_source
    from llm2clip_fast.train.__main__ import main

    demo = make_demo(tmp_path / "fp32")
    source = open_source(str(demo["data"]))
    int8 = dict(demo, cache=tmp_path / "int8_cache")
    build_embedding_cache(source.iter_captions(), bag_of_words, int8["cache"],
                          caption_names=source.caption_names, dim=int(EmbeddingCache.open(demo["cache"]).dim),
                          dtype="int8", metadata={"path": "bag-of-words", "pooling": "mean"})
    assert main(stage2_args(demo, tmp_path / "run_fp", steps=3)) == 0
    assert main(stage2_args(int8, tmp_path / "run_q", steps=3)) == 0
    fp, q = logged_losses(tmp_path / "run_fp"), logged_losses(tmp_path / "run_q")
    assert [s for s, _ in q] == [1, 2, 3]
    # Same data, seed and steps: the int8 cache changes the inputs by less than 0.1% in cosine.
    for (_, a), (_, b) in zip(fp, q):
        assert abs(a - b) < 2e-3 * abs(a), (fp, q)
