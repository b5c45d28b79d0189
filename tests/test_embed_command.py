"""`python -m llm2clip_fast.train embed --load-in-8bit`: the frozen LLM really runs as LLM.int8 and the
cache holds its embeddings (close to, but not bit-equal with, full precision)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _tiny_llama import write_pairs, write_tiny_llama

from llm2clip_fast.data.embedding_cache import EmbeddingCache


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
