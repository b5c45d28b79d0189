"""The trainers on streamed shards (``pipe:cat``). Stage 2 stopped mid-epoch and resumed from its
checkpoint is bit-identical to the uninterrupted run (each rank's loader state, with its stream
positions, rides in the checkpoint); stage 1 resumes exactly too (it re-reads the epoch up to its
saved batch); ``embed`` writes the same cache from a stream as from the local shards."""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile

import pytest
import torch
from _stage2_runs import N_TRAIN, bag_of_words, final_state, logged_losses, stage2_args, stop_stage2_in_step
from _tiny_llama import write_pairs, write_tiny_llama

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import EmbeddingCache, StaleCacheError, build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.train import stage1
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.checkpoint import latest_checkpoint, load_checkpoint

SHARD = 6  # 48 samples in 8 shards; batches of 8 end mid-shard


@pytest.fixture(scope="module")
def streamed_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_stream")
    local = write_demo(root / "data", n_train=N_TRAIN, n_val=0, n_long_detail_groups=0, image_size=32,
                       format="wds", shard_size=SHARD)["train"]
    source = open_source(f"pipe:cat {local}")
    assert source.streaming and len(source.shards) == N_TRAIN // SHARD
    build_embedding_cache(source.iter_captions(), bag_of_words, root / "cache",
                          caption_names=source.caption_names, dim=24,
                          metadata={"path": "bag-of-words", "pooling": "mean"})
    return {"data": f"pipe:cat {local}", "cache": root / "cache"}


def test_stage2_on_streamed_shards_resumes_bit_identically(streamed_demo, tmp_path, monkeypatch, caplog):
    args = ("--save-every", "2", "--adapter-dropout", "0.1", "--caption", "random", "--shuffle-buffer", "5")
    assert train_main(stage2_args(streamed_demo, tmp_path / "full", *args, steps=5)) == 0

    stop_stage2_in_step(monkeypatch, stage2_args(streamed_demo, tmp_path / "stopped", *args, steps=5), 4)
    saved = load_checkpoint(latest_checkpoint(tmp_path / "stopped")).extra["ranks"][0]["loader"]
    assert saved["start_batch"] == 2 and saved["stream"]["positions"][0]["sample"] > 0  # mid-shard
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.data.stream"):
        assert train_main(stage2_args(streamed_demo, tmp_path / "stopped", *args, "--resume", steps=5)) == 0
    # Resumed at the saved stream positions (pipe: cannot seek, so the bytes before are re-read), not by
    # replaying the epoch's first batches.
    assert "cannot seek; re-read and discarded" in caplog.text
    assert "without saved stream positions" not in caplog.text
    assert logged_losses(tmp_path / "stopped") == logged_losses(tmp_path / "full")
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _text_shards(folder, n_pairs: int, per_shard: int) -> str:
    """The tiny Llama's caption pairs as text-only WebDataset shards; returns a brace spec."""
    rows = [json.loads(line) for line in write_pairs(folder, n_pairs).read_text().splitlines()]
    shards = [rows[i:i + per_shard] for i in range(0, n_pairs, per_shard)]
    for s, chunk in enumerate(shards):
        with tarfile.open(folder / f"p-{s:02d}.tar", "w") as tar:
            for row in chunk:
                data = json.dumps({"short": row["short"], "long": row["long"]}).encode()
                info = tarfile.TarInfo(f"{row['key']}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder / f"p-{{00..{len(shards) - 1:02d}}}.tar")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_tiny")
    return {"llm": write_tiny_llama(root / "llm"), "shards": _text_shards(root, 20, 3)}


def _stage1_args(llm, data, out, *extra):
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    return parser.parse_args(["--llm", str(llm), "--data", data, "--out", str(out), "--batch-size", "4",
                              "--quiet", "--max-length", "32", "--eval-fraction", "0", "--steps", "4",
                              "--save-every", "2", "--lr", "5e-3", "--warmup-steps", "1", *extra])


def test_stage1_on_streamed_shards_resumes_exactly(tiny, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file

    from llm2clip_fast.train.run_log import read_jsonl

    data = f"pipe:cat {tiny['shards']}"
    with pytest.raises(ValueError, match=r"--eval-fraction 0\.1 holds samples out by random access"):
        stage1.train_stage1(_stage1_args(tiny["llm"], data, tmp_path / "x", "--eval-fraction", "0.1"))
    stage1.train_stage1(_stage1_args(tiny["llm"], data, tmp_path / "full"))
    original_log = stage1.JsonlLog.log

    def die_at_step_3(self, record):
        original_log(self, record)
        if record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(stage1.JsonlLog, "log", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        stage1.train_stage1(_stage1_args(tiny["llm"], data, tmp_path / "killed"))
    monkeypatch.setattr(stage1.JsonlLog, "log", original_log)
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.data.stream"):
        stage1.train_stage1(_stage1_args(tiny["llm"], data, tmp_path / "killed", "--resume"))
    assert "without saved stream positions: re-reading the epoch" in caplog.text
    losses = [r["loss"] for r in read_jsonl(tmp_path / "killed" / "log.jsonl")]
    assert losses == [r["loss"] for r in read_jsonl(tmp_path / "full" / "log.jsonl")]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_embed_from_a_stream_matches_the_local_shards(tiny, tmp_path):
    from llm2clip_fast.train.embed import embed

    for name, data in (("local", tiny["shards"]), ("stream", f"pipe:cat {tiny['shards']}")):
        embed(llm=str(tiny["llm"]), data=data, out=str(tmp_path / name), dtype="fp32", batch_size=4,
              shard_size=8, progress=False)
    local, streamed = EmbeddingCache.open(tmp_path / "local"), EmbeddingCache.open(tmp_path / "stream")
    assert streamed.keys() == local.keys() and len(local) == 20
    for name in ("short", "long"):
        assert torch.equal(streamed.lookup(local.keys(), name), local.lookup(local.keys(), name))


def test_stage2_checks_streamed_batches_against_the_cache(streamed_demo, tmp_path):
    records = list(open_source(streamed_demo["data"]).iter_captions())
    partial = tmp_path / "partial_cache"
    build_embedding_cache(iter(records[:40]), bag_of_words, partial, caption_names=["short", "long"], dim=24,
                          metadata={"path": "bag-of-words", "pooling": "mean"})
    argv = stage2_args({**streamed_demo, "cache": partial}, tmp_path / "run", steps=6)
    with pytest.raises(ValueError, match=r"lacks embeddings for \d+ key\(s\) of a batch of the streamed"):
        train_main(argv)
    stale = tmp_path / "stale_cache"
    changed = [(k, {**c, "long": c["long"] + " (edited)"}) if i == 3 else (k, c)
               for i, (k, c) in enumerate(records)]
    build_embedding_cache(iter(changed), bag_of_words, stale, caption_names=["short", "long"], dim=24,
                          metadata={"path": "bag-of-words", "pooling": "mean"})
    argv = stage2_args({**streamed_demo, "cache": stale}, tmp_path / "run2", steps=6)
    with pytest.raises(StaleCacheError, match=records[3][0]):
        train_main(argv)
