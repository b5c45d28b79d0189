"""The built-in demo set: procedurally drawn scenes of coloured shapes with short and long captions.

Every image shows 2-4 shapes (circle, square, triangle, diamond, cross) in eight colours and three
sizes, each in its own cell of a 3 x 3 grid, on a grey background. Captions state only what is
visible, with a small vocabulary, so a small vision tower can learn them in minutes:

- ``short``: one or two objects ("a large red circle and a small blue cross");
- ``long``: every object with its size, colour, shape and grid position, the relation of each object to
  the next one, and which one is biggest (80-200 tokens);
- ``label``: "<colour> <shape>" of the dominant (large) object, for zero-shot classification; it is a
  label field, not a caption. ``CLASSES`` lists all 40 possible labels.

Splits: ``train``, ``val`` and ``long_detail``. A long-detail group (keys
``long_detail-<group>-<member>``) shares one base scene of three objects whose description forms an
identical prefix of at least 80 whitespace-separated words; members differ only by an extra small
shape in an empty cell, whose colour is stated after that prefix. Any word-level tokenizer (CLIP BPE,
WordPiece) splits each word into at least one token, so the first 77 tokens agree within a group while
the images and the full captions differ: a 77-token text tower cannot tell the members apart.

Each sample is generated from its own seed (seed, split, index), so any size is cheap and deterministic.
``write_demo`` / ``python -m llm2clip_fast.data.demo`` write it as a JSONL manifest + PNG files or as
WebDataset shards, the formats :func:`~.sources.open_source` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageDraw

from ..atomic_files import write_bytes_atomic, write_stream_atomic
from .records import Record

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 185),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PHRASES = {
    "circle": "a round outline",
    "square": "four equal straight sides",
    "triangle": "three straight sides",
    "diamond": "four sides and a corner at the top",
    "cross": "two bars crossing in the middle",
}
SIZES = {"large": 0.15, "medium": 0.105, "small": 0.07}  # radius as a fraction of the image side
SIZE_PHRASES = {
    "large": "about a third of the picture wide",
    "medium": "about a fifth of the picture wide",
    "small": "only about a seventh of the picture wide",
}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "middle", "right")
ORDINALS = ("first", "second", "third", "fourth", "fifth")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
BACKGROUND = (128, 128, 128)
SPLITS = ("train", "val", "long_detail")
CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)  # every possible label
LABEL_FIELD = "label"
CAPTION_NAMES = ("short", "long")
LONG_DETAIL_PREFIX_WORDS = 80
_SUPERSAMPLE = 2
_SPLIT_SALT = {"train": 0, "val": 1, "long_detail": 2}


@dataclass(frozen=True)
class Shape:
    """One drawn object: attributes and its 3 x 3 grid cell (row, col), plus a sub-cell offset."""

    color: str
    shape: str
    size: str
    row: int
    col: int
    dx: float
    dy: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        if self.row == 1 and self.col == 1:
            return "centre"
        return f"{ROWS[self.row]} {COLS[self.col]}"


def _rng(seed: int, *parts: object) -> random.Random:
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _random_shape(rng: random.Random, size: str, cell: tuple[int, int], taken: set[str]) -> Shape:
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if f"{color} {shape}" not in taken:
            break
    return Shape(color, shape, size, cell[0], cell[1], rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25))


def random_scene(rng: random.Random, n_objects: int) -> list[Shape]:
    """``n_objects`` shapes in distinct cells with distinct colour-shape names; the first is large."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n_objects)
    shapes: list[Shape] = []
    for i, cell in enumerate(cells):
        size = "large" if i == 0 else rng.choice(("medium", "small"))
        shapes.append(_random_shape(rng, size, cell, {s.name for s in shapes}))
    return shapes


def draw_scene(shapes: Sequence[Shape], image_size: int) -> Image.Image:
    """Render the shapes (drawn at 2x and downsampled, for smooth edges) as an RGB image."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = side / 3.0
    for s in shapes:
        r = SIZES[s.size] * side
        slack = max(0.0, cell / 2 - r)
        cx = (s.col + 0.5) * cell + s.dx * slack * 2
        cy = (s.row + 0.5) * cell + s.dy * slack * 2
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.shape == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif s.shape == "triangle":
            draw.polygon(
                [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill
            )
        elif s.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
        else:
            t = r * 0.33
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _relation(a: Shape, b: Shape) -> str:
    parts = []
    if a.row != b.row:
        parts.append("above" if a.row < b.row else "below")
    if a.col != b.col:
        parts.append("to the left of" if a.col < b.col else "to the right of")
    return f"The {a.name} is {' and '.join(parts)} the {b.name}."


def short_caption(shapes: Sequence[Shape], rng: random.Random) -> str:
    """One or two objects: the dominant one, sometimes with the next one."""
    first = shapes[0]
    text = f"a {first.size} {first.color} {first.shape}"
    if len(shapes) > 1 and rng.random() < 0.5:
        second = shapes[1]
        text += f" and a {second.size} {second.color} {second.shape}"
    return text


def long_caption(shapes: Sequence[Shape], count_word: str | None = None) -> str:
    """Every object with attributes and position, consecutive relations, and the biggest one."""
    count = count_word or NUMBER_WORDS[len(shapes)]
    sentences = [f"A picture with {count} shapes on a grey background."]
    for i, s in enumerate(shapes):
        sentences.append(
            f"The {ORDINALS[i]} shape is a {s.size} {s.color} {s.shape} in the {s.position}. "
            f"It is {SIZE_PHRASES[s.size]} and has {SHAPE_PHRASES[s.shape]}."
        )
    sentences.extend(_relation(a, b) for a, b in itertools.pairwise(shapes))
    sentences.append(f"The biggest shape is the {shapes[0].name}.")
    return " ".join(sentences)


def _extra_sentence(extra: Shape) -> str:
    return (
        f"Finally, there is one more shape: a {extra.size} {extra.color} {extra.shape} in the "
        f"{extra.position}, {SIZE_PHRASES[extra.size]}."
    )


def scene_record(split: str, index: int, seed: int, image_size: int) -> Record:
    """Sample ``index`` of the train or val split."""
    rng = _rng(seed, _SPLIT_SALT[split], index)
    shapes = random_scene(rng, rng.randint(2, 4))
    captions = {"short": short_caption(shapes, rng), "long": long_caption(shapes)}
    return Record(f"{split}-{index:07d}", draw_scene(shapes, image_size), captions, shapes[0].name)


def long_detail_group(group: int, seed: int, image_size: int, group_size: int = 4) -> list[Record]:
    """One long-detail group: a shared 3-object base scene plus one extra shape of a different colour each."""
    if not 2 <= group_size <= len(COLORS):
        raise ValueError(f"group_size must be in [2, {len(COLORS)}], got {group_size}")
    rng = _rng(seed, _SPLIT_SALT["long_detail"], group)
    base = random_scene(rng, 3)
    short = short_caption(base, rng)
    prefix = long_caption(base, count_word="several")
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {(s.row, s.col) for s in base}]
    row, col = rng.choice(free)
    shape = rng.choice(SHAPES)
    size = rng.choice(("medium", "small"))
    dx, dy = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)
    taken = {s.name for s in base}
    colors = [c for c in COLORS if f"{c} {shape}" not in taken]
    records = []
    for member, color in enumerate(rng.sample(colors, group_size)):
        extra = Shape(color, shape, size, row, col, dx, dy)
        captions = {"short": short, "long": f"{prefix} {_extra_sentence(extra)}"}
        image = draw_scene([*base, extra], image_size)
        records.append(Record(f"long_detail-{group:05d}-{member}", image, captions, base[0].name))
    return records


def demo_records(
    split: str, n: int, *, seed: int = 0, image_size: int = 64, group_size: int = 4
) -> Iterator[Record]:
    """The records of one split in memory: ``n`` images for train/val, ``n`` groups for long_detail."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "long_detail":
        for group in range(n):
            yield from long_detail_group(group, seed, image_size, group_size)
    else:
        for index in range(n):
            yield scene_record(split, index, seed, image_size)


def long_detail_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """Group long-detail keys (``long_detail-<group>-<member>``) by group id, members in order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        prefix, sep, _member = key.rpartition("-")
        if not sep or not prefix.startswith("long_detail-"):
            raise ValueError(f"{key!r} is not a long-detail key (long_detail-<group>-<member>)")
        groups.setdefault(prefix, []).append(key)
    return {g: sorted(m) for g, m in groups.items()}


# Writing -----------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _sample_json(record: Record) -> dict:
    return {"key": record.key, **record.captions, LABEL_FIELD: record.label}


def _write_manifest_split(folder: Path, records: Iterator[Record]) -> str:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for record in records:
        rel = f"images/{record.key}.png"
        write_bytes_atomic(folder / rel, _png_bytes(record.image))
        row = {"key": record.key, "image": rel, **record.captions, LABEL_FIELD: record.label}
        lines.append(json.dumps(row))
    manifest = folder / "manifest.jsonl"
    write_bytes_atomic(manifest, ("\n".join(lines) + "\n").encode())
    return os.fspath(manifest)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards on every run
    tar.addfile(info, io.BytesIO(data))


def _write_wds_split(folder: Path, records: Iterator[Record], shard_size: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shard, buffer = 0, []

    def flush() -> None:
        path = folder / f"shard-{shard:06d}.tar"

        def write_shard(f: BinaryIO) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for record in buffer:
                    _add_member(tar, f"{record.key}.png", _png_bytes(record.image))
                    _add_member(tar, f"{record.key}.json", json.dumps(_sample_json(record)).encode())

        write_stream_atomic(path, write_shard)

    for record in records:
        buffer.append(record)
        if len(buffer) == shard_size:
            flush()
            shard, buffer = shard + 1, []
    if buffer:
        flush()
        shard += 1
    return os.fspath(folder / f"shard-{{000000..{shard - 1:06d}}}.tar")


def write_demo(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    n_val: int = 500,
    n_long_detail_groups: int = 50,
    format: str = "manifest",
    seed: int = 0,
    image_size: int = 64,
    *,
    group_size: int = 4,
    shard_size: int = 1000,
    splits: Sequence[str] = SPLITS,
) -> dict[str, str]:
    """Write the demo set to ``out_dir/<split>/`` and return ``{split: spec for open_source}``.

    Args:
        out_dir: output folder (created).
        n_train, n_val: images in the train and val splits.
        n_long_detail_groups: groups in the long_detail split (``group_size`` images each).
        format: "manifest" (``<split>/manifest.jsonl`` + ``<split>/images/*.png``) or "wds"
            (``<split>/shard-000000.tar``, ... with ``key.png`` + ``key.json``).
        seed: everything is a function of the seed.
        image_size: side of the square images in pixels.
        splits: which splits to write; a split with zero samples is skipped.

    Files are written atomically; a split whose ``_COMPLETE.json`` records the same parameters is
    not written again.
    """
    if format not in ("manifest", "wds"):
        raise ValueError(f"format must be 'manifest' or 'wds', got {format!r}")
    for name, value in (
        ("n_train", n_train),
        ("n_val", n_val),
        ("n_long_detail_groups", n_long_detail_groups),
    ):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size!r}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; choose from {SPLITS}")
    counts = {"train": n_train, "val": n_val, "long_detail": n_long_detail_groups}
    out = Path(out_dir)
    specs: dict[str, str] = {}
    for split in splits:
        n = counts[split]
        if n == 0:
            continue
        folder = out / split
        params = {
            "split": split,
            "n": n,
            "format": format,
            "seed": seed,
            "image_size": image_size,
            "group_size": group_size,
            "shard_size": shard_size,
            "version": 1,
        }
        marker = folder / "_COMPLETE.json"
        if marker.exists():
            try:
                done = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                done = {}
            if done.get("params") == params:
                specs[split] = done["spec"]
                continue
            marker.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        records = demo_records(split, n, seed=seed, image_size=image_size, group_size=group_size)
        if format == "manifest":
            spec = _write_manifest_split(folder, records)
        else:
            spec = _write_wds_split(folder, records, shard_size)
        write_bytes_atomic(marker, json.dumps({"params": params, "spec": spec}, indent=1).encode())
        specs[split] = spec
    return specs


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="python -m llm2clip_fast.data.demo",
        description="Write the built-in demo set (coloured shapes with short and long captions).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=2000, help="train images (default 2000)")
    parser.add_argument("--n-val", type=int, default=None, help="val images (default n // 4, at least 1)")
    parser.add_argument(
        "--groups",
        type=int,
        default=None,
        help="long-detail groups of 4 images (default n // 40, at least 1)",
    )
    parser.add_argument("--format", choices=("manifest", "wds"), default="manifest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    args = parser.parse_args(argv)
    specs = write_demo(
        args.out,
        n_train=args.n,
        n_val=args.n_val if args.n_val is not None else max(1, args.n // 4),
        n_long_detail_groups=args.groups if args.groups is not None else max(1, args.n // 40),
        format=args.format,
        seed=args.seed,
        image_size=args.image_size,
        shard_size=args.shard_size,
        splits=args.splits,
    )
    for split, spec in specs.items():
        print(f"{split}\t{spec}")
    return specs


if __name__ == "__main__":
    main()
