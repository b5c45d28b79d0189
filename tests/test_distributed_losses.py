"""torch.distributed helpers and the global-batch contrastive losses."""

from __future__ import annotations

import pytest

from llm2clip_fast import distributed as D


def test_single_process_answers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed_from_env() is False
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    D.barrier()
    D.destroy_distributed()


def test_init_refuses_incomplete_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK"):
        D.init_distributed_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_distributed_from_env()


@pytest.mark.parametrize("n,world", [(0, 1), (10, 3), (7, 7), (5, 8)])
def test_shard_indices_cover_once_in_order(n, world):
    shards = [D.shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_indices_bad_input():
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        D.shard_indices(4, 0, 0)
