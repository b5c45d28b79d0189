"""Caption sources: manifest and WebDataset structure errors, bad-data accounting, CLIP preprocessing."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip_fast.data import (
    CLIP_MEAN,
    CLIP_STD,
    BadDataError,
    BadDataPolicy,
    build_loader,
    clip_image_transform,
    open_source,
)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_manifest(folder: Path, n_good: int) -> Path:
    """n_good good rows plus: corrupt bytes, truncated PNG, missing file, empty caption."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        (folder / "img" / f"g{i}.png").write_bytes(png_bytes((i * 9 % 256, 10, 10)))
        rows.append({"key": f"good{i}", "image": f"img/g{i}.png", "short": "s", "long": "l"})
    (folder / "img" / "corrupt.png").write_bytes(b"this is not an image at all")
    whole = png_bytes((1, 2, 3), size=(64, 64))
    (folder / "img" / "trunc.png").write_bytes(whole[: len(whole) // 2])
    (folder / "img" / "empty.png").write_bytes(png_bytes((5, 5, 5)))
    rows += [
        {"key": "corrupt", "image": "img/corrupt.png", "short": "s", "long": "l"},
        {"key": "truncated", "image": "img/trunc.png", "short": "s", "long": "l"},
        {"key": "missing", "image": "img/nowhere.png", "short": "s", "long": "l"},
        {"key": "emptycap", "image": "img/empty.png", "short": "  ", "long": "l"},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


BAD_KEYS = {"corrupt", "truncated", "missing", "emptycap"}


def test_bad_samples_skipped_counted_reported(tmp_path):
    source = open_source(write_bad_manifest(tmp_path, 6))
    records = list(source.iter_records())
    assert [r.key for r in records] == [f"good{i}" for i in range(6)]
    tracker = source.bad_data
    assert (tracker.seen, tracker.bad) == (10, 4) and set(tracker.bad_keys) == BAD_KEYS
    assert "missing" in tracker.bad_keys["missing"] and "empty" in tracker.bad_keys["emptycap"]
    assert "decoded" in tracker.bad_keys["truncated"] or "identified" in tracker.bad_keys["truncated"]
    summary = tracker.summary()
    assert "4 of 10" in summary and all(k in summary for k in BAD_KEYS)
    # Caption-only iteration never opens images: only the empty caption is bad there.
    keys = [k for k, _ in source.iter_captions(bad_data=None)]
    assert "corrupt" in keys and "emptycap" not in keys


def test_loader_workers_report_bad_samples_to_main_process(tmp_path):
    source = open_source(write_bad_manifest(tmp_path, 6))
    loader = build_loader(source, batch_size=3, num_workers=2, image_size=8, bad_data=0.5)
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(f"good{i}" for i in range(6))
    assert loader.bad_data.bad == 4 and set(loader.bad_data.bad_keys) == BAD_KEYS
    assert loader.bad_data.seen == 10


def test_threshold_error_fires_only_after_min_samples(tmp_path):
    source = open_source(write_bad_manifest(tmp_path, 6))
    policy = BadDataPolicy(max_fraction=0.1, min_samples=5)
    with pytest.raises(BadDataError, match="samples were bad"):
        list(build_loader(source, batch_size=2, image_size=8, shuffle=False, bad_data=policy))
    with pytest.raises(BadDataError):
        list(open_source(source.path, bad_data=policy).iter_records())
    # Below min_samples no decision is made during the epoch: every good sample is delivered; the
    # fraction is then enforced at the epoch's end, whatever the number of samples.
    lenient = build_loader(source, batch_size=2, image_size=8, bad_data=BadDataPolicy(0.1, min_samples=11))
    delivered = []
    with pytest.raises(BadDataError, match=r"4 of 10 samples were bad.*--max-bad-fraction"):
        for batch in lenient:
            delivered += batch["keys"]
    assert len(delivered) == 6 and lenient.bad_data.bad == 4


def test_webdataset_bad_members_skipped(tmp_path):
    good = json.dumps({"short": "a", "long": "b"}).encode()
    write_tar(
        tmp_path / "s-0.tar",
        [("a.png", png_bytes((9, 9, 9))), ("a.json", good), ("b.png", b"garbage"), ("b.json", good)],
    )
    write_tar(
        tmp_path / "s-1.tar",
        [
            ("c.png", png_bytes((1, 1, 1))),
            ("c.json", json.dumps({"short": "", "long": "b"}).encode()),
            ("d.json", good),
            ("e.webp", png_bytes((2, 2, 2))),
            ("e.json", good),
        ],
    )
    source = open_source(str(tmp_path / "s-*.tar"))
    assert source.keys() == ["a", "b", "c", "d", "e"]
    assert [r.key for r in source.iter_records()] == ["a", "e"]
    assert set(source.bad_data.bad_keys) == {"b", "c", "d"}
    loader = build_loader(source, batch_size=2, num_workers=2, image_size=8, bad_data=1.0)
    assert sorted(k for b in loader for k in b["keys"]) == ["a", "e"]
    assert set(loader.bad_data.bad_keys) == {"b", "c", "d"}


def test_truncated_shard_keeps_earlier_samples_and_is_reported(tmp_path):
    members, rng = [], np.random.default_rng(0)
    for i in range(6):
        noise = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "RGB")  # ~5 kB as PNG
        buf = io.BytesIO()
        noise.save(buf, format="PNG")
        members += [(f"k{i}.png", buf.getvalue()), (f"k{i}.json", b'{"c": "x"}')]
    write_tar(tmp_path / "full.tar", members)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 3 * 5000])  # inside the third image
    with pytest.warns(UserWarning, match="truncated"):
        source = open_source(tmp_path / "cut.tar")
        n = len(source)
    assert 1 <= n < 6 and list(source.damaged_shards) == [str(tmp_path / "cut.tar")]
    streamed = [r.key for r in source.iter_records()]
    assert streamed and set(streamed) <= set(source.keys())
    assert "truncated" in source.bad_data.summary()
    loader = build_loader(source, batch_size=2, image_size=8, bad_data=1.0)
    assert sorted(k for b in loader for k in b["keys"]) == sorted(streamed)
    assert "truncated" in loader.bad_data.summary()


def test_manifest_structure_errors_list_what_exists(tmp_path):
    (tmp_path / "m.csv").write_text("key,img,caption\nk0,a.png,hello\n")
    with pytest.raises(ValueError, match=r"no image column 'image'.*\['key', 'img', 'caption'\]"):
        open_source(tmp_path / "m.csv")
    with pytest.raises(ValueError, match=r"lacks caption column.*\['long'\].*columns found"):
        open_source(tmp_path / "m.csv", image_column="img", caption_columns=["caption", "long"])
    source = open_source(tmp_path / "m.csv", image_column="img")
    assert source.caption_names == ["caption"] and source.label_column is None
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "c": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        open_source(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        open_source(tmp_path / "absent.tsv")
    (tmp_path / "empty.tsv").write_text("image\tcaption\n")
    with pytest.raises(ValueError, match="no rows"):
        open_source(tmp_path / "empty.tsv")
    (tmp_path / "dup.tsv").write_text("image\tcaption\na.png\tx\na.png\ty\n")
    with pytest.raises(ValueError, match="duplicate keys"):
        open_source(tmp_path / "dup.tsv")


def test_tsv_manifest_relative_paths_and_image_path_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(png_bytes((200, 100, 50)))
    (tmp_path / "m.tsv").write_text("image\tcaption\tlabel\nsub/x.png\ta photo\tcat\n")
    source = open_source(tmp_path / "m.tsv")
    (record,) = list(source.iter_records())
    assert record.key == "sub/x.png" and record.captions == {"caption": "a photo"} and record.label == "cat"
    assert record.image.getpixel((0, 0)) == (200, 100, 50)
    # A spreadsheet CSV export: byte-order mark, quoted field with a comma and a newline.
    (tmp_path / "m.csv").write_bytes('\ufeffimage,caption\nsub/x.png,"two lines,\nwith a comma"\n'.encode())
    assert list(open_source(tmp_path / "m.csv").iter_captions()) == [
        ("sub/x.png", {"caption": "two lines,\nwith a comma"})
    ]


def test_webdataset_structure_errors_list_what_exists(tmp_path):
    write_tar(tmp_path / "d-000.tar", [("a.png", png_bytes((1, 1, 1))), ("a.json", b'{"short": "s"}')])
    with pytest.raises(ValueError, match=r"no WebDataset shards matched.*patterns tried.*d-000\.tar"):
        open_source(str(tmp_path / "x-{000..001}.tar"))
    with pytest.raises(ValueError, match="streaming=False but the spec names remote shards"):
        open_source("pipe:aws s3 cp s3://bucket/d-{000..001}.tar -", streaming=False)
    with pytest.raises(ValueError, match=r"do not exist.*d-001\.tar"):
        open_source(str(tmp_path / "d-{000..001}.tar"))
    with pytest.raises(ValueError, match=r"lacks caption field.*\['long'\].*fields found: \['short'\]"):
        open_source(str(tmp_path / "d-000.tar"), caption_columns=["short", "long"])
    write_tar(tmp_path / "j.tar", [("a.png", png_bytes((1, 1, 1))), ("a.json", b"{oops")])
    with pytest.raises(ValueError, match=r"first sample.*json member cannot be parsed"):
        open_source(tmp_path / "j.tar")
    txt = tmp_path / "t.tar"
    write_tar(txt, [("k.jpg", png_bytes((1, 1, 1))), ("k.txt", b"a caption")])
    source = open_source([txt])
    assert source.caption_names == ["caption"] and list(source.iter_captions()) == [
        ("k", {"caption": "a caption"})
    ]


def test_eval_transform_matches_hand_computation():
    width, height = 10, 6
    pixels = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    image = Image.fromarray(pixels, "RGB")
    out = clip_image_transform(6)(image)  # short side already 6: no resize, centre crop columns 2..8
    want = pixels[:, 2:8].astype(np.float32) / 255.0
    want = (want - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    torch.testing.assert_close(out, torch.from_numpy(want).permute(2, 0, 1), rtol=0, atol=1e-6)
    constant = clip_image_transform(7)(Image.new("RGB", (30, 17), (255, 0, 128)))
    assert constant.shape == (3, 7, 7) and constant.dtype == torch.float32
    for c, v in enumerate((255, 0, 128)):
        expected = (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(constant[c], torch.full((7, 7), expected), rtol=0, atol=1e-5)


def test_train_transform_seeded_and_shaped():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (21, 33, 3), dtype=np.uint8), "RGB")
    train = clip_image_transform(9, train=True, scale=(0.5, 1.0))
    a = train(image, random.Random(4))
    assert a.shape == (3, 9, 9)
    torch.testing.assert_close(a, train(image, random.Random(4)), rtol=0, atol=0)
    assert not torch.equal(a, train(image, random.Random(5)))
    square = Image.fromarray(np.asarray(image)[:9, :9].copy(), "RGB")
    full = clip_image_transform(9, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(
        full(square, random.Random(0)), clip_image_transform(9)(square), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="size"):
        clip_image_transform(0)
    with pytest.raises(ValueError, match="scale"):
        clip_image_transform(8, train=True, scale=(0.0, 1.0))
