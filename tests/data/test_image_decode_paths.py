"""The loader's faster image paths: uint8 hand-over (exact), reduced-size JPEG decoding (opt-in) and GPU
decoding (opt-in; its device half runs here with a CPU stand-in for nvJPEG), with exact resume on each."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip_fast.data import build_loader, open_source
from llm2clip_fast.data.caption_source import decode_image
from llm2clip_fast.data.gpu_decode import JpegCropTransform, decode_batch, unavailable_reason
from llm2clip_fast.data.image_transforms import clip_image_transform, normalize_uint8
from llm2clip_fast.data.reduced_decode import DECODED_FROM, DecodeRequest, ReducedDecode

SIZE = 32


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour image with some detail (a JPEG of noise would be all artefacts)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 100 * np.sin(x / (9 + 5 * c) + rng.uniform(0, 6)) * np.cos(y / (13 + 3 * c))
                for c in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_manifest(tmp_path_factory) -> Path:
    """13 JPEGs of assorted sizes (one PNG, one truncated JPEG) behind a manifest; all under 4 x SIZE a side,
    so the exact path decodes them at full size (larger ones it decodes at half size, its memory rule)."""
    root = tmp_path_factory.mktemp("jpegs")
    rows = []
    for i in range(13):
        w, h = (90 + 3 * i, 70 + 5 * (i % 5)) if i % 2 else (72 + 2 * i, 120)
        img = _photo(w, h, i)
        if i == 5:
            (root / f"{i}.png").write_bytes(_png(img))
            name = f"{i}.png"
        else:
            data = _jpeg(img)
            name = f"{i}.jpg"
            (root / name).write_bytes(data[: len(data) // 3] if i == 8 else data)
        rows.append({"key": f"k{i:02d}", "image": name, "short": f"photo {i}", "long": f"a long photo {i}"})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------
# uint8 hand-over: exact


@pytest.mark.parametrize("train", [True, False])
def test_uint8_pixels_normalised_on_the_device_equal_the_float_path_bit_for_bit(train):
    image = _photo(97, 61, 3)
    floats = clip_image_transform(SIZE, train=train)(image, random.Random(7))
    raw = clip_image_transform(SIZE, train=train, output="uint8")(image, random.Random(7))
    assert raw.dtype == torch.uint8 and raw.shape == (3, SIZE, SIZE)
    assert torch.equal(normalize_uint8(raw, clip_image_transform(SIZE).mean, clip_image_transform(SIZE).std),
                       floats)
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(floats, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="output must be one of"):
        clip_image_transform(SIZE, output="float16")


# -------------------------------------------------------------------------------------------------------
# reduced-size decoding: opt-in


def test_reduction_keeps_every_crop_at_least_the_output_size():
    plan = ReducedDecode(224, (0.9, 1.0), (3 / 4, 4 / 3))
    assert plan.factor(1024, 768) == 2  # the full-size photos of the loader bench
    assert ReducedDecode(336, (0.9, 1.0), (3 / 4, 4 / 3)).factor(1024, 768) == 2
    assert plan.factor(300, 300) == 1 and plan.factor(4000, 3000) == 8
    from llm2clip_fast.data.image_transforms import random_resized_crop_box

    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(50, 3000), rng.randint(50, 3000)
        for scale in ((0.9, 1.0), (0.08, 1.0)):
            p = ReducedDecode(64, scale, (3 / 4, 4 / 3))
            k = p.factor(w, h)
            for _ in range(5):
                _, _, cw, ch = random_resized_crop_box(w, h, scale, p.ratio, rng)
                assert min(cw, ch) / k >= 64 or k == 1, (w, h, scale, k, cw, ch)


@pytest.mark.parametrize("width,height,size,factor,tolerance", [
    (1024, 768, 224, 2, 1.0),  # the loader bench's full-size photos at ViT-B/16's size
    (400, 300, SIZE, 8, 10.0),  # an eighth: a box-like DCT downscale, then a small bicubic step
])
def test_reduced_decode_draws_the_same_crop_and_stays_close_to_exact(width, height, size, factor, tolerance):
    data = _jpeg(_photo(width, height, 1), quality=90)
    request = DecodeRequest(size, ReducedDecode(size, (0.9, 1.0), (3 / 4, 4 / 3)))
    reduced = decode_image("k", data, request)
    assert reduced.info[DECODED_FROM] == (width, height, factor)
    assert reduced.size == (-(-width // factor), -(-height // factor))
    exact = decode_image("k", data, size)
    transform = clip_image_transform(size, train=True, output="uint8")
    got = transform(reduced, random.Random(3)).float()
    want = transform(exact, random.Random(3)).float()
    assert (got - want).abs().mean() < tolerance  # mean |difference| in 8-bit levels: the same crop
    # the default path never marks or reduces past its memory rule
    assert DECODED_FROM not in exact.info
    with pytest.raises(ValueError, match="training crops only"):
        clip_image_transform(size).reduced_decode()


def _batches(loader) -> list[tuple]:
    return [(b["batch_index"], b["keys"], b.get("pixel_values")) for b in loader]


def _equal(a: list[tuple], b: list[tuple]) -> bool:
    return [(i, k) for i, k, _ in a] == [(i, k) for i, k, _ in b] and all(
        torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))


@pytest.mark.parametrize("decode", ["exact", "reduced"])
def test_reduced_and_uint8_paths_resume_exactly(jpeg_manifest, decode):
    def loader(start: int = 0, workers: int = 0):
        source = open_source(jpeg_manifest)
        transform = clip_image_transform(SIZE, train=True, output="uint8")
        return build_loader(source, batch_size=3, image_size=SIZE, transform=transform, decode=decode,
                            num_workers=workers, seed=2, epoch=1, start_batch=start, bad_data=0.5)

    full = _batches(loader())
    assert all(p.dtype == torch.uint8 for _, _, p in full)
    assert sum(len(k) for _, k, _ in full) == 12  # the truncated JPEG is a bad sample
    for start in (1, 2):
        assert _equal(_batches(loader(start)), full[start:]), start
    assert _equal(_batches(loader(workers=2)), full)


def test_reduced_decode_is_refused_for_evaluation(jpeg_manifest):
    with pytest.raises(ValueError, match="training crops"):
        build_loader(open_source(jpeg_manifest), batch_size=2, image_size=SIZE, train=False, decode="reduced")
    with pytest.raises(ValueError, match="decode must be one of"):
        build_loader(open_source(jpeg_manifest), batch_size=2, image_size=SIZE, decode="fast")


# -------------------------------------------------------------------------------------------------------
# GPU decoding: the CPU-side plumbing, nvJPEG replaced by PIL


def _pil_decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for d in datas:
        try:
            with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
                im.load()
                arr = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise RuntimeError(f"decode failed: {exc}") from None
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return out


def test_gpu_decode_is_unavailable_here_with_the_reason():
    assert "needs a CUDA device" in unavailable_reason("cpu")
    if not torch.cuda.is_available():
        assert unavailable_reason("cuda") == "torch sees no CUDA device"


def test_gpu_path_ships_bytes_and_boxes_and_decodes_to_the_exact_crops(jpeg_manifest):
    def loader(start: int = 0):
        source = open_source(jpeg_manifest)
        transform = clip_image_transform(SIZE, train=True, output="uint8")
        return build_loader(source, batch_size=4, image_size=SIZE, transform=transform, decode="gpu", seed=2,
                            epoch=1, start_batch=start, bad_data=0.5)

    batches = list(loader())
    assert all("encoded_images" in b and "pixel_values" not in b for b in batches)
    exact = build_loader(open_source(jpeg_manifest), batch_size=4, image_size=SIZE, seed=2, epoch=1,
                         transform=clip_image_transform(SIZE, train=True, output="uint8"), bad_data=0.5)
    mean, std = clip_image_transform(SIZE).mean, clip_image_transform(SIZE).std
    bad_keys = []
    for got, want in zip(batches, exact):
        items = got["encoded_images"]
        assert any("pixels" in it for it in items) or all("jpeg" in it for it in items)
        pixels, bad = decode_batch(items, size=SIZE, mean=mean, std=std, resample="bicubic",
                                   device=torch.device("cpu"), decode_fn=_pil_decode)
        bad_keys += [key for _, key, _ in bad]
        good = [k for i, k in enumerate(got["keys"]) if i not in {b[0] for b in bad}]
        ref = normalize_uint8(want["pixel_values"], mean, std)
        ref = ref[[want["keys"].index(k) for k in good]]
        assert pixels.shape == ref.shape
        # torch's antialiased bicubic against PIL's on the same crop: ~0.1-0.2 levels of 255 apart
        assert (pixels - ref).abs().mul(255 * 0.27).mean() < 0.5
        for i, it in enumerate(items):
            if "pixels" in it:  # the PNG went the exact CPU way
                assert torch.equal(pixels[good.index(got["keys"][i])], ref[good.index(got["keys"][i])])
    # the truncated JPEG is found by the worker (PIL reads its header) or by the decoder
    assert sum(len(b["keys"]) for b in batches) - len(bad_keys) == 12
    resumed = list(loader(start=1))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in batches[1:]]
    for a, b in zip(resumed, batches[1:]):
        for x, y in zip(a["encoded_images"], b["encoded_images"]):
            assert x.keys() == y.keys() and x.get("box") == y.get("box")
            for k in ("jpeg", "pixels"):
                if k in x:
                    assert torch.equal(x[k], y[k])


def test_gpu_path_needs_a_source_of_bytes_and_uint8(jpeg_manifest):
    with pytest.raises(ValueError, match="uint8"):
        build_loader(open_source(jpeg_manifest), batch_size=2, image_size=SIZE, decode="gpu")
    with pytest.raises(ValueError, match="uint8 training ClipImageTransform"):
        JpegCropTransform(clip_image_transform(SIZE, train=True))
