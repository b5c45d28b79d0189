"""``embed --precision`` and ``--quantize``: what the cache records, what re-encodes, what eval reloads;
and the embed loop's token-budget batches."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _tiny_llama import write_pairs, write_tiny_llama

from llm2clip_fast.data.embedding_cache import EmbeddingCache
from llm2clip_fast.models.llm_encoder import LLMTextEncoder, resolve_precision, token_budget_batches


def _embed(llm, data, out, *extra):
    from llm2clip_fast.train.__main__ import main

    return main(["embed", "--llm", str(llm), "--data", str(data), "--out", str(out), "--dtype", "fp32",
                 "--batch-size", "4", "--shard-size", "4", *extra])


def test_w8a8_cache_records_its_quantization_and_reencodes_when_the_numerics_change(tmp_path, caplog):
    llm, data = write_tiny_llama(tmp_path / "llm"), write_pairs(tmp_path, 6)
    out = tmp_path / "cache"
    assert _embed(llm, data, out, "--quantize", "w8a8-int8", "--precision", "bf16") == 0
    cache = EmbeddingCache.open(out)
    meta = cache.metadata
    assert meta["quantize"] == "w8a8-int8" and meta["precision"] == "bf16" and not meta["load_in_8bit"]
    report = meta["quantization"]
    assert report["mode"] == "w8a8-int8" and meta["quantize_keep"] == report["kept_16bit"]
    settings = cache.manifest["encoder_fingerprint"]["settings"]
    assert settings["precision"] == "bf16" and settings["quantization"]["kept_16bit"] == report["kept_16bit"]
    assert json.loads((out / "config.json").read_text())["quantize"] == "w8a8-int8"

    # The same command reuses every shard; other numerics re-encode them and say what changed.
    events = []
    from llm2clip_fast.train import embed as embed_mod

    embed_mod.embed(llm=str(llm), data=str(data), out=out, dtype="fp32", batch_size=4, shard_size=4,
                    quantize="w8a8-int8", precision="bf16", hook=lambda e, s: events.append(e),
                    progress=False)
    assert events.count("skipped") == 2 and "written" not in events
    caplog.set_level(logging.INFO, logger="llm2clip_fast.train.embed")
    events.clear()
    embed_mod.embed(llm=str(llm), data=str(data), out=out, dtype="fp32", batch_size=4, shard_size=4,
                    quantize="none", precision="fp32", hook=lambda e, s: events.append(e),
                    progress=False)
    assert events.count("encoder changed") == 2 and events.count("written") == 2
    said = caplog.text
    assert "was encoded with other encoder settings" in said and "precision: bf16 -> (default)" in said
    assert "quantization:" in said
    meta = EmbeddingCache.open(out).metadata
    assert meta["quantize"] == "none" and meta["precision"] == "fp32" and "quantization" not in meta


def test_fp32_cache_of_an_older_version_keeps_its_fingerprint():
    """The defaults of earlier versions (fp32, no w8a8) add nothing to the fingerprint's settings."""
    from llm2clip_fast.train.embed import encoder_fingerprint

    keys = ("load_in_8bit", "model_dtype", "pooling", "instruction", "max_length", "normalize",
            "bidirectional", "template", "doc_max_length")
    meta = dict.fromkeys(keys)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("llm2clip_fast.models.llm_fingerprint.llm_weights_fingerprint", lambda *a: {})
        old = encoder_fingerprint(meta, llm="x", lora=None)
        now = encoder_fingerprint(meta, llm="x", lora=None, options={"precision": "fp32"})
        bf16 = encoder_fingerprint(meta, llm="x", lora=None, options={"precision": "bf16"})
    assert old == now and bf16 != old


def test_eval_reloads_the_llm_with_the_recorded_numerics(tmp_path):
    from llm2clip_fast.eval.text_encoder import load_text_encoder

    llm, data = write_tiny_llama(tmp_path / "llm"), write_pairs(tmp_path, 6)
    out = tmp_path / "cache"
    assert _embed(llm, data, out, "--quantize", "w8a8-int8", "--precision", "bf16") == 0
    recorded = EmbeddingCache.open(out).metadata

    class _Config:
        text_tower = "llm-adapter"
        llm = recorded

    class _Model:
        config = _Config()

    encoder = load_text_encoder(_Model(), device="cpu")
    assert encoder.quantize == "w8a8-int8" and encoder.autocast == torch.bfloat16
    assert encoder.quantization.kept_16bit == recorded["quantize_keep"]
    texts = [json.loads(line)["long"] for line in data.read_text().splitlines()]
    cache = EmbeddingCache.open(out)
    torch.testing.assert_close(encoder.encode(texts, show_progress=False), cache.lookup(cache.keys(), "long"),
                               rtol=0, atol=1e-3)  # the cache stores fp32 here; same batches
    plain = load_text_encoder(_Model(), device="cpu", quantize="none")
    assert plain.quantize == "none" and plain.quantization is None and plain.autocast == torch.bfloat16


def test_embed_rejects_conflicting_8bit_options(tmp_path):
    from llm2clip_fast.train import embed as embed_mod

    with pytest.raises(ValueError, match="--load-in-8bit is --quantize llm-int8"):
        embed_mod.embed(llm="x", data="y", out=tmp_path / "c", load_in_8bit=True, quantize="w8a8-fp8")
    with pytest.raises(ValueError, match="--max-batch-tokens must be a positive integer"):
        embed_mod.embed(llm="x", data="y", out=tmp_path / "c", max_batch_tokens=0)


def test_precision_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr("llm2clip_fast.ops._availability.cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr("llm2clip_fast.ops._availability.cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", torch.device("cpu"))


def test_token_budget_batches():
    lengths = [100, 90, 40, 30, 30, 10, 5, 5, 5]
    assert token_budget_batches(lengths, 4, None) == [(0, 4), (4, 8), (8, 9)]
    # 200 padded tokens: 2 x 100, then 5 x 40, then every short one (capped at 4 rows).
    assert token_budget_batches(lengths, 4, 200) == [(0, 2), (2, 6), (6, 9)]
    assert token_budget_batches([500, 3], 8, 100) == [(0, 1), (1, 2)]  # a long row gets its own batch
    assert token_budget_batches([], 4, 100) == []


def test_encode_with_a_token_budget_returns_rows_in_input_order(tmp_path):
    llm = write_tiny_llama(tmp_path / "llm")
    encoder = LLMTextEncoder.from_pretrained(llm, device="cpu")
    texts = ["a red circle", "two large blue squares next to a small green star and a yellow cross " * 3,
             "x", "a photo of a purple heart above three tiny black diamonds", "y z"]
    whole = torch.stack([encoder.encode([t], show_progress=False)[0] for t in texts])
    got = encoder.encode(texts, batch_size=3, max_batch_tokens=40, show_progress=False)
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        encoder.encode(texts, max_batch_tokens=0)
