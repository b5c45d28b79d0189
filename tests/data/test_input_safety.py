"""Inputs that should not hurt a run: manifest image paths confined with ``--image-root-only``, huge
images decoded at a reduced size (bounded peak memory), and adapter arguments checked up front."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip_fast.data.caption_source import decode_image
from llm2clip_fast.data.loader import build_loader
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.ops.adapter import text_adapter

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, size=(8, 8), color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_root_only_confines_manifest_paths(tmp_path):
    data = tmp_path / "data"
    _png(data / "images" / "ok.png")
    _png(tmp_path / "outside.png")
    (data / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [("ok", "images/ok.png"), ("dotdot", "../outside.png"),
            ("absolute", str(tmp_path / "outside.png")), ("symlink", "images/link.png")]
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"key": k, "image": p, "caption": f"c {k}"}) + "\n"
                                for k, p in rows))

    assert all(open_source(manifest).image_at(i).size == (8, 8) for i in range(4))  # default: unchanged
    confined = open_source(manifest, image_root_only=True)
    loader = build_loader(confined, batch_size=4, image_size=8, caption="caption", bad_data=1.0)
    assert [k for b in loader for k in b["keys"]] == ["ok"]
    bad = loader.bad_data.bad_keys
    assert sorted(bad) == ["absolute", "dotdot", "symlink"]
    assert all("outside the manifest's folder" in r and "--image-root-only" in r for r in bad.values())


def test_large_images_decode_smaller_when_the_consumer_needs_little(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (2400, 1600), (10, 120, 200)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    assert decode_image("j", jpeg).size == (2400, 1600)
    # DCT-scaled 1/8 while decoding (300x200), then reduce(3): never below 2 x min_side a side.
    assert decode_image("j", jpeg, min_side=32).size == (100, 67)
    buf = io.BytesIO()
    Image.new("RGB", (1000, 700), (10, 120, 200)).save(buf, format="PNG")
    assert decode_image("p", buf.getvalue(), min_side=32).size == (100, 70)  # reduce(10) after decoding
    assert decode_image("p", buf.getvalue(), min_side=400).size == (1000, 700)  # never below 2 x min_side

    data = tmp_path / "data"
    data.mkdir()
    (data / "big.jpg").write_bytes(jpeg)
    (data / "m.jsonl").write_text(json.dumps({"key": "big", "image": "big.jpg", "caption": "a"}) + "\n")
    source = open_source(data / "m.jsonl")
    batch = next(iter(build_loader(source, batch_size=1, image_size=16, caption="caption")))
    assert batch["pixel_values"].shape == (1, 3, 16, 16) and source.decode_min_side == 16


_PEAK = r"""
import resource, sys
from llm2clip_fast.data.caption_source import read_image_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = read_image_file("huge", sys.argv[1], min_side=224)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(image.size[0], image.size[1], (after - before) // 1024)
"""


def test_a_9000px_jpeg_decodes_within_bounded_memory(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (9000, 9000), (90, 90, 90)).save(path, quality=50)  # 243 MB as full RGB
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    width, height, grown_mb = map(int, out)
    assert grown_mb < 60, f"decoding grew the peak RSS by {grown_mb} MB"
    assert (width, height) == (563, 563)  # draft 1/8 (1125) then reduce(2): >= 2 x 224


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dropout": 1.0}, "dropout must be a float in \\[0, 1\\)"),
    ({"dropout": -0.1}, "dropout must be a float in \\[0, 1\\)"),
    ({"ln_eps": 0.0}, "ln_eps must be a float > 0"),
    ({"ln_eps": -1e-5}, "ln_eps must be a float > 0"),
    ({"l2_eps": 0.0}, "l2_eps must be a float > 0"),
])
def test_text_adapter_rejects_bad_dropout_and_eps(kwargs, match):
    d, n = 6, 4
    block = (torch.ones(d), torch.zeros(d), torch.randn(2 * d, d), torch.zeros(2 * d), torch.randn(d, 2 * d),
             torch.zeros(d))
    head = (torch.ones(d), torch.zeros(d), torch.randn(n, d), torch.zeros(n))
    x = torch.randn(3, d)
    assert text_adapter(x, [block], head).shape == (3, n)
    with pytest.raises(ValueError, match=match):
        text_adapter(x, [block], head, training=True, **kwargs)
