"""build_loader: rank x worker sharding, seeded shuffle, caption choice, resumption, batch layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip_fast.data import build_loader, open_source


def write_manifest(folder: Path, n: int) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (20 + i % 5, 17), (i * 7 % 256, 40, 90)).save(folder / "img" / f"{i}.png")
        row = {"key": f"k{i:03d}", "image": f"img/{i}.png", "short": f"short {i}", "long": f"long {i}"}
        row["label"] = f"class{i % 3}"
        lines.append(json.dumps(row))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return open_source(write_manifest(tmp_path_factory.mktemp("loader"), 23))


def epoch_keys(source, epoch: int, world_size: int, num_workers: int, **kw) -> list[list[str]]:
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(
            source,
            batch_size=4,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            epoch=epoch,
            seed=3,
            with_images=False,
            **kw,
        )
        per_rank.append([k for batch in loader for k in batch["keys"]])
    return per_rank


def test_two_ranks_two_workers_cover_every_key_once_and_reshuffle(source):
    epoch0 = epoch_keys(source, 0, world_size=2, num_workers=2)
    counts = Counter(k for rank in epoch0 for k in rank)
    assert sorted(counts) == sorted(source.keys())
    assert set(counts.values()) == {1}
    # The same epoch in one process gives the same batches as with workers: order is a function of data.
    assert epoch_keys(source, 0, world_size=2, num_workers=0) == epoch0
    epoch1 = epoch_keys(source, 1, world_size=2, num_workers=2)
    assert sorted(k for r in epoch1 for k in r) == sorted(source.keys())
    assert epoch1 != epoch0


def test_drop_last_gives_equal_full_batches_per_rank(source):
    sizes = []
    for rank in range(3):
        loader = build_loader(
            source, batch_size=3, rank=rank, world_size=3, drop_last=True, with_images=False
        )
        sizes.append([len(b["keys"]) for b in loader])
    assert sizes == [[3, 3]] * 3  # 23 // 3 = 7 per rank -> 2 full batches of 3


def test_ranks_together_see_the_global_batches_of_one_process(source):
    single = [b["keys"] for b in build_loader(source, batch_size=6, with_images=False, seed=4, epoch=2)]
    ranks = [
        [
            b["keys"]
            for b in build_loader(
                source, batch_size=2, rank=r, world_size=3, with_images=False, seed=4, epoch=2
            )
        ]
        for r in range(3)
    ]
    for b, keys in enumerate(single):
        assert sorted(keys) == sorted(k for rank in ranks for k in (rank[b] if b < len(rank) else []))


def test_set_epoch_and_start_batch_resume_exactly(source):
    loader = build_loader(source, batch_size=5, num_workers=2, seed=1, image_size=8)
    loader.set_epoch(2)
    full = list(loader)
    assert [b["batch_index"] for b in full] == list(range(len(loader)))
    loader.set_epoch(2, start_batch=2)
    resumed = list(loader)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[2:]]
    assert [b["captions"] for b in resumed] == [b["captions"] for b in full[2:]]
    for a, b in zip(resumed, full[2:]):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
    fresh = build_loader(source, batch_size=5, seed=1, image_size=8)
    fresh.load_state_dict({"epoch": 2, "start_batch": 3})
    assert [b["keys"] for b in fresh] == [b["keys"] for b in full[3:]]
    assert fresh.state_dict()["start_batch"] == len(full)


def test_batch_fields_and_caption_choice(source):
    loader = build_loader(source, batch_size=6, image_size=12, caption="random", seed=0)
    batches = list(loader)
    b = batches[0]
    assert b["pixel_values"].shape == (6, 3, 12, 12) and b["pixel_values"].dtype == torch.float32
    assert len(b["captions"]) == len(b["caption_names"]) == len(b["all_captions"]) == len(b["labels"]) == 6
    for text, name, all_caps in zip(b["captions"], b["caption_names"], b["all_captions"]):
        assert all_caps[name] == text
    names = Counter(n for batch in batches for n in batch["caption_names"])
    assert set(names) == {"short", "long"}
    fixed = build_loader(source, batch_size=6, caption="long", with_images=False)
    assert all(n == "long" for batch in fixed for n in batch["caption_names"])
    none = next(iter(build_loader(source, batch_size=6, caption=None, with_images=False)))
    assert "captions" not in none and "pixel_values" not in none and len(none["all_captions"]) == 6


def test_bad_arguments_raise_clear_errors(source):
    with pytest.raises(ValueError, match="caption"):
        build_loader(source, batch_size=2, caption="medium")
    with pytest.raises(ValueError, match="rank"):
        build_loader(source, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(source, batch_size=0)
