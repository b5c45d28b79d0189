"""The embedding cache records what made it (a hash per caption text, the encoder's fingerprint): embed
re-encodes exactly the shards whose inputs changed and says so, stage 2 refuses a cache built from other
captions naming the first differing key, caches from before fingerprints stay readable, and captions
skipped at embed time (empty) are reported there and counted as bad data by stage 2."""

from __future__ import annotations

import json
import shutil
import zlib

import pytest
import torch
from _stage2_runs import bag_of_words, make_demo, stage2_args
from safetensors.torch import load_file, save_file

from llm2clip_fast.data.bad_data import BadDataError
from llm2clip_fast.data.embedding_cache import EmbeddingCache, StaleCacheError, build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.train.__main__ import main as train_main

DIM = 6
NAMES = ["short", "long"]


def _records(n, changed=()):
    return [(f"img{i:03d}", {"short": f"short caption {i}" + (" (edited)" if i in changed else ""),
                             "long": f"a longer caption number {i}"}) for i in range(n)]


def _encode(texts):
    return torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                        for t in texts])


def _build(out, records, fingerprint=None):
    events = []
    build_embedding_cache(iter(records), _encode, out, caption_names=NAMES, dim=DIM, shard_size=4,
                          dtype="float32", fingerprint=fingerprint, hook=lambda e, s: events.append((e, s)))
    return events


def test_changed_captions_re_encode_exactly_their_shards(tmp_path):
    out = tmp_path / "c"
    _build(out, _records(11), fingerprint={"weights": "a"})
    events = _build(out, _records(11, changed={5}), fingerprint={"weights": "a"})
    assert ("captions changed", 1) in events and ("written", 1) in events
    assert sorted(s for e, s in events if e == "skipped") == [0, 2]
    fresh = tmp_path / "fresh"
    _build(fresh, _records(11, changed={5}), fingerprint={"weights": "a"})
    a, b = EmbeddingCache.open(out), EmbeddingCache.open(fresh)
    assert torch.equal(a.lookup(a.keys(), "short"), b.lookup(b.keys(), "short"))

    events = _build(out, _records(11, changed={5}), fingerprint={"weights": "b"})
    assert sorted(s for e, s in events if e == "encoder changed") == [0, 1, 2]
    assert EmbeddingCache.open(out).manifest["encoder_fingerprint"] == {"weights": "b"}


def test_check_captions_names_the_first_differing_key(tmp_path):
    _build(tmp_path / "c", _records(11))
    cache = EmbeddingCache.open(tmp_path / "c")
    cache.check_captions(_records(11))
    with pytest.raises(StaleCacheError, match=r"key 'img006', caption 'short'"):
        cache.check_captions(_records(11, changed={6, 9}))
    cache.check_captions(_records(11, changed={6}), caption_names=["long"])  # only what a run uses


def _strip_fingerprints(folder):
    """Turn a cache into one written before caption fingerprints existed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (folder / shard.pop("captions_file")).unlink()
        del shard["captions_sha256"], shard["encoder_sha256"]
    del manifest["encoder_fingerprint"], manifest["skipped"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_old_cache_stays_readable_and_embed_re_encodes_it(tmp_path):
    out = tmp_path / "c"
    _build(out, _records(6))
    _strip_fingerprints(out)
    cache = EmbeddingCache.open(out)
    assert not cache.has_caption_fingerprints and len(cache) == 6
    with pytest.raises(ValueError, match="rerun the embed step"):
        cache.check_captions(_records(6))
    events = _build(out, _records(6))
    assert [e for e, _ in events if e == "written"] == ["written", "written"]
    assert EmbeddingCache.open(out).has_caption_fingerprints


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("cache_fingerprint"))


def test_stage2_refuses_a_cache_of_other_captions_with_the_same_keys(demo, tmp_path, capsys):
    source = open_source(str(demo["data"]))
    records = [(k, {**c, "long": c["long"] + " Edited."} if i == 3 else c)
               for i, (k, c) in enumerate(source.iter_captions())]
    other = tmp_path / "other_cache"
    build_embedding_cache(records, bag_of_words, other, caption_names=source.caption_names, dim=24)
    argv = stage2_args(demo, tmp_path / "run", steps=1)
    argv[argv.index("--embeddings") + 1] = str(other)
    with pytest.raises(StaleCacheError, match=rf"key {records[3][0]!r}, caption 'long'"):
        train_main(argv)
    # The same cache from before fingerprints: accepted with a warning saying how to get the check.
    _strip_fingerprints(other)
    argv[argv.index("--out") + 1] = str(tmp_path / "run2")
    assert train_main(argv) == 0
    assert "predates caption fingerprints" in capsys.readouterr().err


def test_embed_reports_changed_weights_and_captions_and_skipped_empty_captions(tmp_path, capsys):
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    llm = tmp_path / "llm"
    shutil.copytree(packaged_minilm_path(), llm)
    rows = [{"key": k, "image": f"{k}.png", **c} for k, c in _records(7)]
    data = tmp_path / "captions.jsonl"

    def write(rows):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(rows)
    out = tmp_path / "cache"
    argv = ["embed", "--llm", str(llm), "--data", str(data), "--out", str(out), "--dtype", "fp32",
            "--batch-size", "8", "--shard-size", "3", "--quiet"]
    assert train_main(argv) == 0
    before = EmbeddingCache.open(out).lookup([r["key"] for r in rows], "long")

    capsys.readouterr()
    write([{**r, "long": "changed"} if r["key"] == "img004" else r for r in rows])
    assert train_main(argv) == 0
    err = capsys.readouterr().err
    assert "shard 1: captions changed" in err and "shard 0" not in err and "shard 2" not in err

    weights = next(llm.glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights))
    assert train_main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"shard {i}: encoder changed" in err for i in range(3))
    after = EmbeddingCache.open(out).lookup([r["key"] for r in rows], "short")
    assert not torch.equal(after, before)

    write([{**r, "short": ""} if r["key"] == "img002" else r for r in rows])
    with pytest.raises(BadDataError, match=r"1 of 7 samples were bad.*--max-bad-fraction"):
        train_main(argv)
    assert train_main([*argv, "--max-bad-fraction", "0.2"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 record(s) with an empty or missing caption" in err and "img002" in err
    cache = EmbeddingCache.open(out)
    assert list(cache.skipped) == ["img002"] and "img002" not in cache and len(cache) == 6


def test_stage2_counts_captions_skipped_at_embed_time_as_bad_data(demo, tmp_path):
    source = open_source(str(demo["data"]))
    rows = [json.loads(line) for line in demo["data"].read_text().splitlines()]
    rows[5]["long"] = ""
    data = tmp_path / "data" / "manifest.jsonl"
    shutil.copytree(demo["data"].parent, data.parent)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = {rows[5]["key"]: "empty caption 'long'"}
    records = [(r["key"], {n: r[n] for n in source.caption_names}) for r in rows if r["long"]]
    cache = tmp_path / "cache"
    build_embedding_cache(records, bag_of_words, cache, caption_names=source.caption_names, dim=24,
                          skipped=skipped)
    argv = stage2_args({"data": data, "cache": cache}, tmp_path / "run", "--max-bad-fraction", "0.05",
                       steps=6)
    assert train_main(argv) == 0
    bad = json.loads((tmp_path / "run" / "summary.json").read_text())["bad_data"]
    assert bad["bad"] == 1 and list(bad["bad_keys"]) == [rows[5]["key"]]
