"""int8 storage of cached caption embeddings: one byte per value plus a 4-byte scale per row.

Scheme (per cache shard and caption column ``c``, all statistics over the shard's records):

1. ``offset[c]``: the mean embedding; ``col_scale[c]``: the per-dimension RMS around it (1 where a
   dimension is constant). LLM embeddings are anisotropic: a large shared mean direction and a few
   dimensions far larger than the rest (massive activations). Removing the mean and equalising the
   dimensions first means the int8 grid is spent on what tells captions apart, not on the outliers.
2. ``y = (x - offset[c]) / col_scale[c]`` is stored as symmetric per-row absmax int8:
   ``row_scale = max|y| / 127``, ``q = round(y / row_scale)`` in [-127, 127].
3. Read back as ``offset[c] + col_scale[c] * row_scale * q`` (float32).

Plain per-row absmax on ``x`` (:func:`absmax_int8_roundtrip`, the baseline ``bench/cache_throughput.py``
measures against) spends the grid on the largest dimension: with a 100x outlier dimension its error
grows with it, while the scheme above keeps the error at the level of the equalised residual.
The statistics cost ``2 * captions * dim`` float32 per shard, nothing next to the shard itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX = 127
_STATS_BLOCK = 1024


@dataclass(frozen=True)
class Int8Shard:
    """A quantised shard: ``values`` (records, captions, dim) int8, ``row_scale`` (records, captions)
    float32, ``stats`` (2, captions, dim) float32 = (offset, col_scale)."""

    values: np.ndarray
    row_scale: np.ndarray
    stats: np.ndarray


def quantize_shard(array: np.ndarray) -> Int8Shard:
    """Quantise a finite (records, captions, dim) float array as described in the module docstring."""
    if array.ndim != 3:
        raise ValueError(f"expected a (records, captions, dim) array, got shape {array.shape}")
    x = np.asarray(array, dtype=np.float32)
    # Statistics accumulate in float64 so large shards do not drift, a block of records at a time so
    # a 10,000-record shard of 4096-d pairs needs no float64 copy of itself (650 MB).
    offset = x.mean(axis=0, dtype=np.float64)  # (captions, dim)
    squares = np.zeros(x.shape[1:], dtype=np.float64)
    for start in range(0, len(x), _STATS_BLOCK):
        centred = x[start:start + _STATS_BLOCK].astype(np.float64) - offset
        squares += (centred * centred).sum(axis=0)
    col_scale = np.sqrt(squares / len(x))
    col_scale[col_scale == 0] = 1.0  # a constant dimension is exactly its offset
    offset32, col32 = offset.astype(np.float32), col_scale.astype(np.float32)
    # The residual is computed from the float32 statistics that are stored, so dequantisation inverts
    # exactly what was quantised.
    y = (x - offset32) / col32
    absmax = np.abs(y).max(axis=2)
    row_scale = (absmax / QMAX).astype(np.float32)
    safe = np.where(row_scale > 0, row_scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(y / safe[..., None]), -QMAX, QMAX).astype(np.int8)
    return Int8Shard(q, row_scale, np.stack([offset32, col32]))


def dequantize_rows(values: np.ndarray, row_scale: np.ndarray, offset: np.ndarray,
                    col_scale: np.ndarray) -> np.ndarray:
    """float32 embeddings of int8 ``values`` (n, dim) with their ``row_scale`` (n,) and the column's
    ``offset`` / ``col_scale`` (dim,)."""
    out = np.asarray(values).astype(np.float32)  # a new array: scaled in place below
    out *= np.asarray(row_scale, dtype=np.float32)[:, None]
    out *= col_scale
    out += offset
    return out


def dequantize_shard(shard: Int8Shard) -> np.ndarray:
    """The whole shard back as float32 (records, captions, dim)."""
    offset, col_scale = shard.stats
    return (shard.values.astype(np.float32) * shard.row_scale[..., None]) * col_scale + offset


def absmax_int8_roundtrip(x: np.ndarray) -> np.ndarray:
    """Plain symmetric per-row absmax int8 and back (no centring, no per-dimension scale): the baseline."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1, keepdims=True) / QMAX
    safe = np.where(scale > 0, scale, 1.0)
    return np.clip(np.rint(x / safe), -QMAX, QMAX) * scale
