"""Manifest sources: a CSV, TSV or JSONL file with an image-path column and caption columns.

Relative image paths resolve against the manifest's folder. Caption columns default to every column
except the key, image and label columns. Without a key column the image path (as written) is the key.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .bad_data import BadDataPolicy, BadDataTracker, BadSampleError
from .caption_source import CaptionSource, read_image_bytes, read_image_file

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")



class MissingManifestError(FileNotFoundError, ValueError):
    """The manifest file does not exist (a FileNotFoundError, and a ValueError like every other
    problem of a caption source)."""

def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(column names in first-seen order, rows) of a manifest; unreadable files raise ValueError."""
    suffix = path.suffix.lower()
    try:
        with open(
            path, encoding="utf-8-sig", newline=""
        ) as f:  # utf-8-sig: spreadsheet exports start with a BOM
            text = f.read()
    except FileNotFoundError:
        raise MissingManifestError(f"manifest {os.fspath(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {os.fspath(path)!r} cannot be read as UTF-8 text: {exc}") from None
    if suffix == ".jsonl":
        rows = []
        # split on "\n" only: str.splitlines would also cut at U+2028 inside JSON strings
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"manifest {os.fspath(path)!r} line {lineno} is not valid JSON: {exc}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"manifest {os.fspath(path)!r} line {lineno} is a JSON {type(row).__name__}, "
                    "expected an object {column: value}"
                )
            rows.append(row)
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        return list(columns), rows
    delimiter = "\t" if suffix == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)  # keeps quoted newlines
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise ValueError(f"manifest {os.fspath(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
    columns_list = list(reader.fieldnames or [])
    return columns_list, rows


def _as_text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


class ManifestSource(CaptionSource):
    """Samples listed in a CSV/TSV/JSONL manifest; see :func:`~.sources.open_source` for the arguments."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_column: str = "image",
        caption_columns: Sequence[str] | None = None,
        key_column: str | None = "key",
        label_column: str | None = "label",
        bad_data: BadDataPolicy | float | None = None,
        image_root_only: bool = False,
        require_images: bool = True,
    ):
        self.path = Path(path)
        self.image_root_only = bool(image_root_only)
        if self.path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ValueError(f"manifest must end in one of {MANIFEST_SUFFIXES}, got {os.fspath(path)!r}")
        columns, rows = _read_rows(self.path)
        where = f"manifest {os.fspath(self.path)!r}"
        if not rows:
            raise ValueError(f"{where} has no rows (columns found: {columns})")
        if image_column not in columns and require_images:
            raise ValueError(f"{where} has no image column {image_column!r}; columns found: {columns}")
        # A text-only manifest (stage 1, embed): captions and keys, no images.
        self.has_images = image_column in columns
        has_key = key_column is not None and key_column in columns
        self.label_column = label_column if label_column is not None and label_column in columns else None
        reserved = {image_column, key_column, label_column}
        if caption_columns is None:
            names = [c for c in columns if c not in reserved]
            if not names:
                raise ValueError(f"{where} has no caption columns; columns found: {columns}")
        else:
            names = [caption_columns] if isinstance(caption_columns, str) else list(caption_columns)
            missing = [c for c in names if c not in columns]
            if missing or not names:
                raise ValueError(
                    f"{where} lacks caption column(s) {missing or names}; columns found: {columns}"
                )
        self.caption_names = names
        self.image_column = image_column
        self.root = self.path.parent

        self._keys: list[str] = []
        self._images: list[str] = []
        self._captions: list[tuple[str | None, ...]] = []
        self._labels: list[str | None] = []
        for i, row in enumerate(rows):
            image = _as_text(row.get(image_column)) or ""
            key = _as_text(row.get(key_column)) if has_key else image
            if not key:
                key = f"row{i}"
            self._keys.append(key)
            self._images.append(image)
            self._captions.append(tuple(_as_text(row.get(c)) for c in names))
            self._labels.append(_as_text(row.get(self.label_column)) if self.label_column else None)
        seen: set[str] = set()
        dups = [k for k in self._keys if k in seen or seen.add(k)]
        if dups:
            which = (
                f"key column {key_column!r}" if has_key else f"image column {image_column!r} (used as key)"
            )
            raise ValueError(f"{where}: {len(dups)} duplicate keys in {which}, e.g. {dups[:5]}")
        self.bad_data = BadDataTracker(bad_data)

    def __len__(self) -> int:
        return len(self._keys)

    def key_at(self, index: int) -> str:
        return self._keys[index]

    def raw_captions_at(self, index: int) -> dict[str, str]:
        return {n: t for n, t in zip(self.caption_names, self._captions[index]) if t is not None}

    def label_at(self, index: int) -> str | None:
        return self._labels[index]

    def image_path_at(self, index: int) -> Path:
        return self.root / self._images[index]

    def image_at(self, index: int) -> Image.Image:
        return read_image_file(self._keys[index], self._checked_image_path(index), self.decode_min_side)

    def image_bytes_at(self, index: int) -> bytes:
        """The image file's bytes, undecoded (for decoding on the GPU)."""
        return read_image_bytes(self._keys[index], self._checked_image_path(index))

    def _checked_image_path(self, index: int) -> Path:
        key = self._keys[index]
        if not self.has_images:
            raise ValueError(f"manifest {os.fspath(self.path)!r} is text-only (no image column "
                             f"{self.image_column!r}): it serves captions, not images")
        if not self._images[index]:
            raise BadSampleError(key, f"image column {self.image_column!r} is empty")
        path = self.image_path_at(index)
        if self.image_root_only:
            resolved, root = path.resolve(), self.root.resolve()
            if not resolved.is_relative_to(root):
                raise BadSampleError(key, f"image path {self._images[index]!r} leads outside the manifest's "
                                     f"folder {os.fspath(root)!r} (--image-root-only)")
        return path

    def keys(self) -> list[str]:
        return list(self._keys)

    def describe(self) -> str:
        return (
            f"ManifestSource({os.fspath(self.path)!r}, {len(self)} samples, captions={self.caption_names}, "
            f"label={self.label_column!r})"
        )
