"""Image loading: images/s per CPU core for each decode path, and the cores per GPU a recipe needs.

    python bench/loader_throughput.py                 # demo images and 1024x768 JPEGs, 224 and 336 crops
    python bench/loader_throughput.py --quick         # a smoke run
    python bench/loader_throughput.py --device cuda   # adds GPU decoding (torchvision's nvJPEG)

What a loader worker does per training image, measured in one process on one thread (one worker = one
core): read the file, decode it, draw the random resized crop and resize it to the tower's size, turn it
into a tensor, and collate the batch (``build_loader`` with ``num_workers=0``, the trainer's transform).
Paths (``--decode`` / ``--pixel-dtype`` of ``python -m llm2clip_fast.train stage2``):

- ``exact float32``: full-size PIL decode, PIL resize, normalised float32 (this library before uint8);
- ``exact uint8``: the same pixels handed over as uint8 and normalised on the device (bit-identical;
  the trainer's default);
- ``reduced uint8``: JPEGs decoded at 1/2, 1/4 or 1/8 size where every possible crop keeps the output size
  (opt-in: pixels differ slightly);
- ``gpu (worker side)``: what is left on the CPU with ``--decode gpu``: read the bytes, read the JPEG header,
  draw the crop; the decode and resize run on the GPU (``gpu decode`` rows, CUDA only: nvJPEG batch decode +
  antialiased resize + normalisation, images/s of the GPU).

Data: the demo set's images (PNG, 64 px) and generated 1024x768 JPEGs (quality 90, smooth colour fields
plus noise, ~200-300 KB, like photos). ``rate`` is images/s of the best of ``--reps`` passes (the least
disturbed by other processes on a shared machine; ``median_rate`` is also recorded), ``cores_per_gpu`` is
``--gpu-rate`` (default 500 images/s: ViT-L/14-336 at ~1 s per 512 images) over ``rate``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import add_common_args, machine_description, print_table, write_json

PATHS = ("exact float32", "exact uint8", "reduced uint8", "gpu (worker side)")
GPU_RATE = 500.0  # images/s one GPU consumes training ViT-L/14-336 at ~1 s per 512 images


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour fields with edges and sensor-like noise (a pure gradient would
    compress, and decode, unrealistically fast)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(2, 40), rng.uniform(2, 40), rng.uniform(0, 6.3)
            img[..., c] += 40 * np.sin(x / fx + phase) * np.cos(y / fy - phase)
        img[..., c] += 128 + 30 * (x > rng.uniform(0, width)) - 30 * (y > rng.uniform(0, height))
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_set(folder: Path, n: int, width: int = 1024, height: int = 768) -> Path:
    """``n`` photo-like JPEGs and a manifest over them; returns the manifest."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (folder / f"{i:05d}.jpg").write_bytes(photo_jpeg(width, height, i))
        rows.append({"key": f"img{i:05d}", "image": f"{i:05d}.jpg", "caption": f"photo {i}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _loader(spec: str, path: str, size: int, batch: int):
    from llm2clip_fast.data import build_loader, open_source
    from llm2clip_fast.data.image_transforms import clip_image_transform

    decode = {"exact float32": "exact", "exact uint8": "exact", "reduced uint8": "reduced",
              "gpu (worker side)": "gpu"}[path]
    output = "float32" if path == "exact float32" else "uint8"
    transform = clip_image_transform(size, train=True, output=output)
    return build_loader(open_source(spec), batch_size=batch, image_size=size, transform=transform,
                        decode=decode, num_workers=0, seed=0, caption=None, bad_data=0.0)


def cpu_rate(spec: str, path: str, size: int, batch: int, reps: int) -> dict[str, Any]:
    """Images/s of one loader pass on this thread (best and median of ``reps`` passes)."""
    loader = _loader(spec, path, size, batch)
    rates = []
    for epoch in range(reps):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(b["keys"]) for b in loader)
        rates.append(n / (time.perf_counter() - t0))
    return {"rate": max(rates), "median_rate": statistics.median(rates), "images": n}


def gpu_decode_rate(spec: str, size: int, batch: int, reps: int, device: str = "cuda") -> dict[str, Any]:
    """Images/s of the GPU half of ``--decode gpu``: nvJPEG batch decode, crop, antialiased resize and
    normalisation of ``batch`` images at a time (the worker half prepared beforehand)."""
    from llm2clip_fast.data.gpu_decode import decode_batch, unavailable_reason
    from llm2clip_fast.data.image_transforms import CLIP_MEAN, CLIP_STD

    why = unavailable_reason(device)
    if why is not None:
        return {"status": "unavailable", "error": why}
    loader = _loader(spec, "gpu (worker side)", size, batch)
    batches = [b["encoded_images"] for b in loader]
    dev = torch.device(device)

    def run() -> int:
        n = 0
        for items in batches:
            pixels, _ = decode_batch(items, size=size, mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic",
                                     device=dev)
            n += pixels.shape[0]
        torch.cuda.synchronize(dev)
        return n

    run()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t0))
    return {"status": "ok", "rate": max(rates), "median_rate": statistics.median(rates), "images": n}


def measure(datasets: dict[str, str], sizes: list[int], batch: int, reps: int, device: str,
            gpu_rate: float) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # one worker, one core
    rows = []
    for data, spec in datasets.items():
        for size in sizes:
            for path in PATHS:
                row = {"data": data, "size": size, "path": path, "where": "cpu, 1 core"}
                try:
                    row.update(cpu_rate(spec, path, size, batch, reps), status="ok")
                    row["cores_per_gpu"] = gpu_rate / row["rate"]
                except ValueError as exc:  # e.g. a PNG-only set: nothing to decode on the GPU
                    row.update(status="skipped", error=str(exc))
                rows.append(row)
            if data != "demo":
                row = {"data": data, "size": size, "path": "gpu decode", "where": device}
                if torch.device(device).type == "cuda":
                    row.update(gpu_decode_rate(spec, size, batch, reps, device))
                else:
                    from llm2clip_fast.data.gpu_decode import unavailable_reason

                    target = "cuda" if torch.cuda.is_available() else device
                    row.update(status="unavailable", error=unavailable_reason(target))
                rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from llm2clip_fast.data.demo import write_demo

    n_full = 8 if args.quick else args.images
    sizes = [224] if args.quick else [224, 336]
    reps = 1 if args.quick else args.reps
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        root = Path(tmp)
        demo = write_demo(root / "demo", n_train=16 if args.quick else 256, n_val=0, n_long_detail_groups=0,
                          splits=("train",))["train"]
        full = write_jpeg_set(root / "full", n_full)
        kb = statistics.mean(p.stat().st_size for p in (root / "full").glob("*.jpg")) / 1024
        rows = measure({"demo": demo, "1024x768 jpeg": str(full)}, sizes, args.batch, reps, args.device,
                       args.gpu_rate)
    print_table(rows, ["data", "size", "path", "where", "rate", "median_rate", "cores_per_gpu", "status"],
                title=f"loader images/s per core (best of {reps} passes; 1024x768 JPEGs average {kb:.0f} "
                f"KB); cores_per_gpu = {args.gpu_rate:g} images/s / rate")
    for row in rows:
        if row.get("status") == "unavailable":
            print(f"  {row['path']} ({row['data']}, {row['size']}): unavailable: {row['error']}")
    path = write_json(args.out, {"bench": "loader_throughput", "device": args.device,
                                 "gpu_rate": args.gpu_rate, "jpeg_kb": kb, "machine": machine_description(),
                                 "rows": rows})
    print(f"wrote {path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=96, help="1024x768 JPEGs to generate (default 96)")
    parser.add_argument("--batch", type=int, default=32, help="loader batch size")
    parser.add_argument("--reps", type=int, default=3, help="passes over the data per path (best counts)")
    parser.add_argument("--gpu-rate", type=float, default=GPU_RATE,
                        help="images/s one GPU consumes (default 500: ViT-L/14-336 at ~1 s per 512 images)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/loader_throughput.json")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
