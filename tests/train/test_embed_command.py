"""`python -m llm2clip_fast.train embed`: end to end with the packaged MiniLM (what the cache holds, a
finished cache reused), and with ``--load-in-8bit``: the frozen LLM really runs as LLM.int8 and the
cache holds its embeddings (close to, but not bit-equal with, full precision). The cache format itself:
test_embedding_cache.py; ``--dtype int8`` storage: test_embedding_cache_int8.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_llama import write_pairs, write_tiny_llama

from llm2clip_fast.data.embedding_cache import EmbeddingCache


def _records(n):
    return [(f"img{i:03d}", {"short": f"short caption {i}",
                             "long": f"a much longer caption number {i} " * (i % 4 + 1)})
            for i in range(n)]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_embed_command_with_packaged_minilm(tmp_path):
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder, packaged_minilm_path
    from llm2clip_fast.train.__main__ import main

    records = _records(7)
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"key": k, "image": f"{k}.png", **c}) + "\n" for k, c in records))
    out = tmp_path / "cache"
    argv = ["embed", "--llm", str(packaged_minilm_path()), "--data", str(manifest), "--out", str(out),
            "--dtype", "fp32", "--batch-size", "3", "--shard-size", "3", "--captions", "long,short",
            "--quiet"]
    assert main(argv) == 0
    cache = EmbeddingCache.open(out)
    assert cache.caption_names == ["long", "short"] and cache.keys() == [k for k, _ in records]
    assert cache.metadata["max_length"] == 256 and not cache.metadata["load_in_8bit"]
    # embed's default precision: bf16 autocast where the CPU has native bf16, else fp32.
    enc = LLMTextEncoder.from_pretrained(packaged_minilm_path(), device="cpu", precision="auto")
    assert cache.metadata["precision"] == ("bf16" if enc.autocast is not None else "fp32")
    want = enc.encode([c["long"] for _, c in records], show_progress=False)
    got = cache.lookup(cache.keys(), "long")
    if enc.autocast is None:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # bf16 rounding depends on the batch a caption was padded in (embed batches per shard)
        assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9999
    before = _files(out)
    assert main(argv) == 0  # a finished cache: every shard reused, files unchanged
    assert _files(out) == before
    assert np.load(out / "shard-00000.npy", mmap_mode="r").shape == (3, 2, 384)


def test_embed_command_with_load_in_8bit(tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder
    from llm2clip_fast.train.__main__ import main

    llm, data = write_tiny_llama(tmp_path / "llm"), write_pairs(tmp_path, 6)
    built = []
    real = LLMTextEncoder.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        built.append(real(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(LLMTextEncoder, "from_pretrained", classmethod(spy))
    out = tmp_path / "cache"
    assert main(["embed", "--llm", str(llm), "--data", str(data), "--out", str(out), "--dtype", "fp32",
                 "--batch-size", "4", "--shard-size", "4", "--load-in-8bit", "--quiet"]) == 0
    assert len(built) == 1
    int8_layers = [m for m in built[0].model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8_layers) == 7  # q, k, v, o, gate, up, down of the one layer
    cache = EmbeddingCache.open(out)
    assert cache.metadata["load_in_8bit"] is True and len(cache) == 6
    texts = [json.loads(line)["long"] for line in data.read_text().splitlines()]
    got = cache.lookup(cache.keys(), "long")
    torch.testing.assert_close(got, built[0].encode(texts, show_progress=False), rtol=0, atol=1e-6)
    monkeypatch.undo()
    full = LLMTextEncoder.from_pretrained(llm, dtype="fp32").encode(texts, show_progress=False)
    assert not torch.equal(got, full)  # int8 weights round: a full-precision run would be bit-equal
    assert F.cosine_similarity(got, full).min() > 0.999  # measured 0.99998: LLM.int8 is close
