"""The bad-data rule holds whatever the size of the data: the fraction is enforced at the end of every
epoch (and at the end of a run shorter than one), samples lost in a truncated WebDataset shard count,
and the message names the ``--max-bad-fraction`` flag (accepted by stage1, embed and stage2)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from _stage2_runs import make_demo, stage2_args

from llm2clip_fast.data.bad_data import BadDataError
from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.loader import build_loader
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.train import stage1
from llm2clip_fast.train.__main__ import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("bad_data_rule"))


def _with_missing_images(demo, folder: Path, n_bad: int) -> Path:
    shutil.copytree(demo["data"].parent, folder)
    rows = [json.loads(line) for line in demo["data"].read_text().splitlines()]
    for row in rows[:n_bad]:
        row["image"] = "images/does-not-exist.png"
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "manifest.jsonl"


def test_half_bad_small_source_stops_at_the_end_of_the_epoch(demo, tmp_path):
    data = _with_missing_images(demo, tmp_path / "data", 24)  # 24 of 48: far fewer than 100 samples
    loader = build_loader(str(data), batch_size=8, image_size=32, caption="long")
    with pytest.raises(BadDataError, match=r"24 of 48 samples were bad.*--max-bad-fraction"):
        for _ in loader:
            pass
    loader = build_loader(str(data), batch_size=8, image_size=32, caption="long", bad_data=0.5)
    assert sum(len(b["keys"]) for b in loader) == 24


def test_stage2_enforces_the_fraction_on_a_run_shorter_than_an_epoch(demo, tmp_path):
    data = _with_missing_images(demo, tmp_path / "data", 2)  # 2 of 48 = 4% > 1%
    # (The cache still covers every key: only the images are missing.)
    with pytest.raises(BadDataError, match="--max-bad-fraction"):
        train_main(stage2_args({**demo, "data": data}, tmp_path / "run", "--save-every", "0", steps=2))
    assert train_main(stage2_args({**demo, "data": data}, tmp_path / "ok", "--save-every", "0",
                                  "--max-bad-fraction", "0.05", steps=6)) == 0
    bad = json.loads((tmp_path / "ok" / "summary.json").read_text())["bad_data"]
    assert bad["bad"] == 2 and bad["seen"] == 48


def test_samples_lost_in_a_truncated_shard_count_as_bad(tmp_path):
    spec = write_demo(tmp_path / "wds", n_train=12, n_val=0, n_long_detail_groups=0, image_size=16,
                      format="wds", shard_size=4, splits=("train",))["train"]
    last = sorted((tmp_path / "wds" / "train").glob("shard-*.tar"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # keeps at most the first sample of the last shard
    with pytest.warns(UserWarning, match="truncated"):
        source = open_source(spec)
        kept = len(source)
    assert 8 <= kept < 12 and source.lost_samples == {str(last): max(1, 4 - (kept - 8))}
    loader = build_loader(source, batch_size=4, image_size=16, caption="short", bad_data=0.9)
    for _ in loader:
        pass
    lost = source.lost_samples[str(last)]
    assert loader.bad_data.lost == lost and loader.bad_data.seen == kept + lost
    assert loader.bad_data.bad >= lost
    strict = build_loader(source, batch_size=4, image_size=16, caption="short", bad_data=0.01)
    with pytest.raises(BadDataError, match=rf"\({lost} lost in damaged shards\).*--max-bad-fraction"):
        for _ in strict:
            pass


def test_stage1_accepts_max_bad_fraction():
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    args = parser.parse_args(["--llm", "x", "--data", "y", "--out", "z", "--max-bad-fraction", "0.2"])
    assert args.max_bad_fraction == 0.2


@pytest.mark.slow
def test_stage1_enforces_the_fraction_on_a_small_source(tmp_path):
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    spec = write_demo(tmp_path / "demo", n_train=16, n_val=0, n_long_detail_groups=0, image_size=8,
                      splits=("train",))["train"]
    rows = [json.loads(line) for line in Path(spec).read_text().splitlines()]
    for row in rows[::8]:
        row["short"] = ""  # 2 of 16, far fewer than the 100 samples a mid-epoch decision waits for
    Path(spec).write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)

    def args(out, *extra):
        return parser.parse_args(["--llm", str(packaged_minilm_path()), "--data", spec, "--out", str(out),
                                  "--batch-size", "8", "--epochs", "1", "--eval-fraction", "0",
                                  "--lora-r", "2", "--max-length", "32", "--quiet", *extra])

    with pytest.raises(BadDataError, match=r"2 of 16 samples were bad.*--max-bad-fraction"):
        stage1.train_stage1(args(tmp_path / "strict"))
    result = stage1.train_stage1(args(tmp_path / "lenient", "--max-bad-fraction", "0.2"))
    assert result.steps == 2
