"""Stage 2 on streamed shards (``pipe:cat``): stopped mid-epoch and resumed from its checkpoint, the run is
bit-identical to the uninterrupted one (each rank's loader state, with its stream positions, rides in
the checkpoint)."""

from __future__ import annotations

import logging

import pytest
from _stage2_runs import N_TRAIN, bag_of_words, final_state, logged_losses, stage2_args

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.train import stage2
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

    real_step, calls = stage2.train_step, {"n": 0}

    def stops_in_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("stopped in step 4")
        return real_step(*a, **k)

    monkeypatch.setattr(stage2, "train_step", stops_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_main(stage2_args(streamed_demo, tmp_path / "stopped", *args, steps=5))
    monkeypatch.setattr(stage2, "train_step", real_step)
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
