"""Exact resumption of build_loader at any slot with any worker count, and per-epoch caption draws.

A resumed loader must yield, in order, the very batches (slot index, keys, captions) an uninterrupted
run yields from that slot on: odd and even ``start_batch``, 0 to 3 workers. With 2 workers and an odd
``start_batch`` a worker assignment that ignored ``start_batch`` would swap neighbouring slots.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llm2clip_fast.data import build_loader, open_source
from llm2clip_fast.data.loader import sample_rng

N_SAMPLES = 29
BATCH = 3  # 10 slots: the last one short, so resuming near the end meets a partial batch too


def _write_captions(folder: Path, n: int) -> Path:
    rows = [{"key": f"s{i:03d}", "image": f"{i}.png", "short": f"short {i}", "long": f"long {i}",
             "medium": f"medium {i}"} for i in range(n)]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return open_source(_write_captions(tmp_path_factory.mktemp("resume"), N_SAMPLES))


def _run(source, *, num_workers: int, start_batch: int = 0, epoch: int = 1) -> list[tuple]:
    loader = build_loader(source, batch_size=BATCH, with_images=False, num_workers=num_workers, seed=5,
                          epoch=epoch, start_batch=start_batch, caption="random")
    return [(b["batch_index"], b["keys"], b["captions"]) for b in loader]


@pytest.fixture(scope="module")
def uninterrupted(source):
    full = _run(source, num_workers=0)
    assert [b[0] for b in full] == list(range(10))
    assert sorted(k for b in full for k in b[1]) == [f"s{i:03d}" for i in range(N_SAMPLES)]
    return full


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_resume_at_odd_and_even_slots_yields_the_uninterrupted_batches(source, uninterrupted, num_workers):
    # One loader re-used with set_epoch, as the trainers do, so worker start-up is paid per resume only.
    loader = build_loader(source, batch_size=BATCH, with_images=False, num_workers=num_workers, seed=5,
                          epoch=1, caption="random")
    for start in (0, 1, 2, 3, 9):
        loader.set_epoch(1, start_batch=start)
        got = [(b["batch_index"], b["keys"], b["captions"]) for b in loader]
        assert [g[0] for g in got] == list(range(start, 10)), f"start_batch={start}"
        assert got == uninterrupted[start:], f"start_batch={start}"
        assert loader.state_dict()["start_batch"] == 10


def test_resume_through_the_constructor_with_two_workers(source, uninterrupted):
    assert _run(source, num_workers=2, start_batch=3) == uninterrupted[3:]


def test_caption_draw_is_redrawn_each_epoch_and_follows_the_sample_seed(source):
    loader = build_loader(source, batch_size=BATCH, with_images=False, seed=5, caption="random")
    names = ["short", "long", "medium"]
    per_epoch = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        chosen = {k: n for b in loader for k, n in zip(b["keys"], b["caption_names"])}
        # Hand-computed draw: uniform over the names, seeded by (seed, epoch, key).
        assert chosen == {k: sample_rng(5, epoch, k, "caption").choice(names) for k in chosen}
        per_epoch.append(chosen)
    # 29 keys, 3 names: two epochs drawing the same name for every key has probability 3**-29.
    assert per_epoch[0] != per_epoch[1] and per_epoch[1] != per_epoch[2]
    changed = sum(per_epoch[0][k] != per_epoch[1][k] for k in per_epoch[0])
    assert changed >= N_SAMPLES // 4
    assert set(Counter(per_epoch[0].values())) == set(names)
