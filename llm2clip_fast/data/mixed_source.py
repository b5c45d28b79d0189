"""Several caption sources trained as one weighted mix, each batch drawn from one of them.

The official LLM2CLIP stage 2 (microsoft/LLM2CLIP ``llm2clip/run.sh`` and ``llm2clip/training/data.py``
at commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a) trains on
``--train-data-list "data/cc3m/{00..00287}.tar;data/cc12m/{00..01001}.tar" --train-num-samples-list
2873538 10000225 --dataset-resampled``: ``MixingDataLoader`` picks the dataset of every batch with
``np.random.seed(count + num_batches * epoch); np.random.choice(range(n), p=sample_weights)``, the weights
being each dataset's share of the samples, and each dataset is a WebDataset whose shards are drawn with
replacement (``ResampledShards2``). All ranks seed alike, so a whole global batch comes from one dataset.

Here ``--data "A;B"`` opens each part with :func:`~.sources.open_source` (local manifests or shards; the
official separator ``;``) and :class:`MixedSource` presents them as one source: keys are prefixed with
the part's name (``cc3m/000000123``: the folder of its shards or the manifest's stem, or ``partN`` when
those are not unique; one part keeps its keys), caption names are those every part has. Its
:meth:`MixedSource.rank_batches` lays out an epoch of ``len(mix) // (world x batch)`` global batches:
the part of global batch ``b`` is drawn from ``weights`` (default: the parts' sample counts, as the
official ``--train-num-samples-list``) exactly as ``MixingDataLoader`` draws it (seeded by ``b +
batches_per_epoch * epoch``), the same on every rank; its ``world x batch`` samples are

- resampled (``resampled=True``, the official ``--dataset-resampled``): drawn uniformly with replacement
  from the part (the sample-level counterpart of drawing shards with replacement: there is no shard
  order to keep with random access);
- otherwise the next ones of the part's own shuffled order for the epoch (seeded by (seed, epoch, part),
  a fresh order when a part is used up within the epoch).

Rank ``r`` takes the ``r``-th ``batch``-sized slice of each global batch. Every choice is a function of
(seed, epoch, batch slot), so a run resumes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .caption_source import CaptionSource

MIX_SEPARATOR = ";"


def is_mix_spec(spec: object) -> bool:
    """Whether ``spec`` names several sources (``A;B``; a ``pipe:`` command keeps its own semicolons)."""
    text = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else ""
    return MIX_SEPARATOR in text and not text.startswith("pipe:")


def split_mix_spec(spec: str | os.PathLike) -> list[str]:
    parts = [p.strip() for p in os.fspath(spec).split(MIX_SEPARATOR)]
    if any(not p for p in parts):
        raise ValueError(f"--data {os.fspath(spec)!r}: an empty part between ';' separators")
    return parts


def part_name(spec: str) -> str:
    """A readable name for one part: its shards' folder (``data/cc3m/{00..99}.tar`` -> ``cc3m``) or the
    manifest's stem."""
    path = Path(spec.split("::")[0])
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        return path.stem
    if os.path.isdir(path):
        return path.name
    return path.parent.name or path.stem


def parse_weights(text: str | Sequence[float] | None, n: int) -> list[float] | None:
    """``--data-weights``: n comma-separated (or a list of) positive numbers; None keeps the default."""
    if text is None:
        return None
    values = [float(v) for v in text.split(",")] if isinstance(text, str) else [float(v) for v in text]
    if len(values) != n:
        raise ValueError(f"--data-weights gives {len(values)} weights for {n} --data part(s)")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--data-weights must be positive numbers, got {values}")
    return values


class MixedSource(CaptionSource):
    """The parts as one random-access source (see the module docstring).

    Args:
        parts: the opened sources (random access: local manifests or WebDataset shards).
        names: one name per part (key prefixes when there are several parts).
        weights: relative weights of the parts (default: their sample counts).
        resampled: draw each batch's samples with replacement (``--dataset-resampled``).
    """

    def __init__(self, parts: Sequence[CaptionSource], names: Sequence[str],
                 weights: Sequence[float] | None = None, resampled: bool = False) -> None:
        if not parts:
            raise ValueError("a mix needs at least one source")
        streamed = [n for p, n in zip(parts, names, strict=True) if getattr(p, "streaming", False)]
        if streamed:
            raise ValueError(f"--data parts {streamed} are streamed: a ';' mix needs random access (local "
                             "manifests or tar shards)")
        empty = [n for p, n in zip(parts, names, strict=True) if len(p) == 0]
        if empty:
            raise ValueError(f"--data parts {empty} hold no samples")
        if len(set(names)) != len(names):
            names = [f"part{i}" for i in range(len(parts))]
        self.parts = list(parts)
        self.names = list(names)
        counts = [len(p) for p in parts]
        raw = list(weights) if weights is not None else [float(c) for c in counts]
        if len(raw) != len(parts) or not all(w > 0 for w in raw):
            raise ValueError(f"mix weights must be {len(parts)} positive numbers, got {raw}")
        self.weights = [w / sum(raw) for w in raw]
        self.weights_from = "--data-weights" if weights is not None else "sample counts"
        self.resampled = bool(resampled)
        self.offsets = np.cumsum([0, *counts]).tolist()
        common = [n for n in parts[0].caption_names if all(n in p.caption_names for p in parts[1:])]
        if not common:
            raise ValueError(f"the --data parts share no caption name: "
                             f"{ {n: p.caption_names for n, p in zip(self.names, parts, strict=True)} }")
        self.caption_names = common
        labels = {p.label_column for p in parts}
        self.label_column = parts[0].label_column if len(labels) == 1 else None
        self.bad_data = parts[0].bad_data
        self.damaged_shards = {f"{n}/{k}": v for n, p in zip(self.names, parts, strict=True)
                               for k, v in getattr(p, "damaged_shards", {}).items()}
        self.lost_samples = {f"{n}/{k}": v for n, p in zip(self.names, parts, strict=True)
                             for k, v in getattr(p, "lost_samples", {}).items()}

    # -- where an index lives ------------------------------------------------------------------------

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mix of {len(self)} samples")
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return part, index - self.offsets[part]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def key_at(self, index: int) -> str:
        part, i = self._locate(index)
        key = self.parts[part].key_at(i)
        return key if len(self.parts) == 1 else f"{self.names[part]}/{key}"

    def raw_captions_at(self, index: int) -> dict[str, str]:
        part, i = self._locate(index)
        return self.parts[part].raw_captions_at(i)

    def label_at(self, index: int) -> str | None:
        part, i = self._locate(index)
        return self.parts[part].label_at(i) if self.label_column is not None else None

    def image_at(self, index: int) -> Image.Image:
        part, i = self._locate(index)
        return self.parts[part].image_at(i)

    def image_bytes_at(self, index: int) -> bytes:
        part, i = self._locate(index)
        return self.parts[part].image_bytes_at(i)

    @property
    def serves_image_bytes(self) -> bool:
        return all(p.serves_image_bytes for p in self.parts)

    def set_decode_min_side(self, min_side) -> None:  # type: ignore[no-untyped-def]
        super().set_decode_min_side(min_side)
        for p in self.parts:
            p.set_decode_min_side(min_side)

    def describe(self) -> str:
        shares = ", ".join(f"{n} {len(p)} samples ({100 * w:.1f}%)"
                           for n, p, w in zip(self.names, self.parts, self.weights, strict=True))
        return (f"mix of {len(self.parts)} sources ({shares}; weights from {self.weights_from}"
                f"{', resampled' if self.resampled else ''})")

    def as_dict(self) -> dict[str, object]:
        """What a run records about the mix (``config.json``)."""
        return {"parts": {n: {"samples": len(p), "weight": w}
                          for n, p, w in zip(self.names, self.parts, self.weights, strict=True)},
                "weights_from": self.weights_from, "resampled": self.resampled}

    # -- the epoch's batches --------------------------------------------------------------------------

    def batch_parts(self, n_batches: int, seed: int, epoch: int) -> list[int]:
        """The part of each of the epoch's ``n_batches`` global batches (every rank agrees): the official
        ``MixingDataLoader`` draw, ``np.random.seed(count + num_batches * epoch)`` then
        ``np.random.choice(range(n), p=weights)`` (a private ``RandomState`` here, the same numbers
        without touching numpy's global state). Like the official one it does not depend on ``seed``."""
        del seed
        return [int(np.random.RandomState(b + n_batches * epoch).choice(range(len(self.parts)),
                                                                         p=self.weights))
                for b in range(n_batches)]

    def rank_batches(self, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                     shuffle: bool, drop_last: bool) -> list[np.ndarray]:
        """This rank's batch slots (arrays of mix indices) of ``epoch``: see the module docstring.
        ``shuffle`` False (evaluation) keeps the plain source order, one part after another."""
        if not shuffle:
            order = np.arange(len(self), dtype=np.int64)[rank::world_size]
            if drop_last:
                order = order[: (len(self) // world_size // batch_size) * batch_size]
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        global_batch = batch_size * world_size
        n_batches = len(self) // global_batch
        parts = self.batch_parts(n_batches, seed, epoch)
        cursors = [0] * len(self.parts)
        orders: dict[tuple[int, int], np.ndarray] = {}
        out = []
        for b, part in enumerate(parts):
            size, offset = len(self.parts[part]), self.offsets[part]
            if self.resampled:
                rng = np.random.default_rng([seed, epoch, b, part, 0x72])
                chosen = rng.integers(0, size, global_batch)
            else:
                cycles, at = np.divmod(np.arange(cursors[part], cursors[part] + global_batch), size)
                chosen = np.empty(global_batch, dtype=np.int64)
                for cycle in np.unique(cycles):
                    key = (part, int(cycle))
                    if key not in orders:
                        orders[key] = np.random.default_rng([seed, epoch, part, int(cycle)]).permutation(size)
                    chosen[cycles == cycle] = orders[key][at[cycles == cycle]]
                cursors[part] += global_batch
            out.append((chosen[rank * batch_size:(rank + 1) * batch_size] + offset).astype(np.int64))
        return out


def open_mix(spec: str | os.PathLike, open_part, weights: str | Sequence[float] | None = None,
             resampled: bool = False) -> MixedSource:
    """``--data "A;B"``: each part opened by ``open_part(spec)``, mixed by ``weights``."""
    specs = split_mix_spec(spec)
    parts = [open_part(s) for s in specs]
    return MixedSource(parts, [part_name(s) for s in specs], parse_weights(weights, len(parts)), resampled)
