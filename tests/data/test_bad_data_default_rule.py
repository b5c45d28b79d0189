"""The README's default rule: a run stops once more than 1% of the samples seen are bad (decided after
100 samples), counted by hand on a tracker and through build_loader with its default policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2clip_fast.data import BadDataError, build_loader, open_source
from llm2clip_fast.data.bad_data import BadDataTracker


def test_default_tracker_allows_exactly_one_percent_and_stops_above():
    tracker = BadDataTracker()
    tracker.merge(990, [])
    tracker.merge(10, [(f"bad{i}", "empty caption") for i in range(10)])
    assert (tracker.seen, tracker.bad) == (1000, 10)
    tracker.check()  # 10 / 1000 = 1%: allowed
    tracker.merge(1, [("bad10", "missing image")])
    with pytest.raises(BadDataError, match=r"11 of 1001 samples were bad \(1\.10% > 1\.00% allowed\)"):
        tracker.check()


def test_default_tracker_decides_only_after_100_samples():
    tracker = BadDataTracker()
    tracker.merge(99, [(f"bad{i}", "missing image") for i in range(50)])
    tracker.check()  # 50% bad, but only 99 seen
    tracker.merge(1, [])
    with pytest.raises(BadDataError, match="50 of 100 samples were bad"):
        tracker.check()


def _caption_source(folder: Path, n_good: int, n_empty: int):
    # Empty captions last: with shuffle=False the fraction only reaches its final value at the end.
    rows = [{"key": f"g{i:03d}", "image": f"{i}.png", "short": f"short {i}"} for i in range(n_good)]
    rows += [{"key": f"e{i}", "image": "e.png", "short": "  "} for i in range(n_empty)]
    folder.mkdir()
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return open_source(path)


def test_loader_with_default_policy_stops_just_above_one_percent(tmp_path):
    at_limit = _caption_source(tmp_path / "at", n_good=297, n_empty=3)
    loader = build_loader(at_limit, batch_size=50, with_images=False, shuffle=False)
    assert sum(len(b["keys"]) for b in loader) == 297
    assert (loader.bad_data.seen, loader.bad_data.bad) == (300, 3)
    above = _caption_source(tmp_path / "above", n_good=296, n_empty=4)
    with pytest.raises(BadDataError, match=r"4 of 300 samples were bad"):
        list(build_loader(above, batch_size=50, with_images=False, shuffle=False))
