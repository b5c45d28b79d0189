"""Stage-2 embedding-cache reader: embeddings/s from disk (cold and warm page cache), bytes per caption
and fidelity to fp32, per storage dtype (fp32, fp16, int8).

    python bench/cache_throughput.py             # 20,000 records x 2 captions x 4096 dims per dtype
    python bench/cache_throughput.py --quick     # a smoke run (seconds)

For each dtype a real cache is written with :func:`build_embedding_cache` from random LLM-like
vectors (:func:`llm_like_embeddings`: a large shared mean, heavy-tailed per-dimension scales,
Student-t values and a few large, nearly constant "massive activation" dimensions, as LLM hidden
states have), then read the
way stage 2 reads it: :meth:`EmbeddingCache.lookup` of a batch of random keys (float32 out; int8
dequantised). Batches are the recipe's: 4096 (the global batch, one reader serving it all) and 512
(one of 8 ranks' share).

- warm: every file of the cache read once beforehand, so the shards sit in the page cache; the
  median of several batches.
- cold: before each timed batch the cache is closed, ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops the
  cache files' pages from the page cache and ``mincore`` on a fresh mapping checks how much is still
  resident (repeated up to 10 times until nothing is; ``cold_resident_fraction`` is the worst batch's
  share left: 0 means truly cold; a filesystem that ignores the advice shows here, and the cold
  figure is then not cold); the cache is reopened (``verify="size"``,
  not timed) and one batch is timed. The batch then reads from the storage device, with the
  kernel's readahead.

Fidelity: cosine of each stored row (as read back) to the fp32 vector it was made from, mean and
min, also after subtracting the data's mean vector (``centred_cos_*``: the part of the vector that
tells captions apart, which the shared mean otherwise hides). A row ``int8-absmax`` gives plain
per-row absmax int8 on the same vectors, the baseline for the cache's int8 scheme.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import add_common_args, machine_description, print_table, write_json

DTYPES = ("fp32", "fp16", "int8")
CAPTIONS = ("short", "long")


def llm_like_embeddings(n: int, dim: int, *, seed: int = 0, rows_seed: int = 0,
                        outliers: int = 4) -> np.ndarray:
    """(n, dim) float32 vectors shaped like mean-pooled LLM embeddings.

    The distribution (fixed by ``seed``): ``x = mean + scale * t5``, ``mean`` ~ N(0, 2^2) per dimension,
    ``scale`` log-normal(0, 1) per dimension, values Student-t with 5 degrees of freedom, and
    ``outliers`` dimensions whose mean is 50x and scale 5x larger (massive activations: large and
    nearly constant across inputs). ``rows_seed`` draws different rows of the same distribution.
    """
    g = np.random.default_rng(seed)
    mean = 2.0 * g.standard_normal(dim)
    scale = g.lognormal(0.0, 1.0, dim)
    big = g.choice(dim, size=min(outliers, dim), replace=False)
    mean[big] *= 50
    scale[big] *= 5
    rows = np.random.default_rng([seed, rows_seed]).standard_t(5, size=(n, dim))
    return (mean + rows * scale).astype(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def fidelity(read: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> dict[str, float]:
    """Cosine of ``read`` rows to ``ref`` rows (mean, min), raw and after removing ``ref``'s mean
    (computed in chunks of rows: the float64 copies of a whole cache would not fit in memory)."""
    mu = ref.mean(axis=0, dtype=np.float64)
    raw, centred = [], []
    for i in range(0, len(ref), chunk):
        a, b = read[i:i + chunk], ref[i:i + chunk]
        raw.append(_cosines(a, b))
        centred.append(_cosines(a - mu, b - mu))
    r, c = np.concatenate(raw), np.concatenate(centred)
    return {"cos_mean": float(r.mean()), "cos_min": float(r.min()),
            "centred_cos_mean": float(c.mean()), "centred_cos_min": float(c.min())}


# ------------------------------------------------------------------------------------ page cache
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_PAGE = mmap.PAGESIZE


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (they were fsynced when written)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_cold(files: list[Path], tries: int = 10) -> float:
    """Evict ``files`` until none of their pages is resident (pages still under the kernel's I/O
    from a previous read can survive one eviction); returns the fraction left resident."""
    for _ in range(tries):
        evict(files)
        left = resident_fraction(files)
        if left == 0:
            break
        time.sleep(0.05)
    return left


def resident_fraction(paths: list[Path]) -> float:
    """Fraction of the files' pages in the page cache (``mincore`` on a fresh mapping: no page is touched)."""
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        with open(p, "rb") as f:
            mapping = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        view = np.frombuffer(mapping, dtype=np.uint8)
        pages = (size + _PAGE - 1) // _PAGE
        vec = (ctypes.c_ubyte * pages)()
        failed = _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, vec) != 0
        errno = ctypes.get_errno()
        del view  # the mapping cannot close while a view exports it
        mapping.close()
        if failed:
            raise OSError(errno, f"mincore failed on {p}")
        resident += int(np.frombuffer(vec, dtype=np.uint8).__and__(1).sum())
        total += pages
    return resident / total if total else 1.0


# ------------------------------------------------------------------------------------ the bench
def build_cache(out: Path, dtype: str, records: int, dim: int, shard_size: int, seed: int) -> None:
    from llm2clip_fast.data.embedding_cache import build_embedding_cache

    def encode(texts: list[str]) -> torch.Tensor:
        first = int(texts[0].split(":")[0])
        rows = llm_like_embeddings(len(texts), dim, seed=seed, rows_seed=first // shard_size)
        return torch.from_numpy(rows)

    recs = ((f"r{i:08d}", {c: f"{i}:{c}" for c in CAPTIONS}) for i in range(records))
    build_embedding_cache(recs, encode, out, caption_names=list(CAPTIONS), dim=dim, dtype=dtype,
                          shard_size=shard_size)


def reference(records: int, dim: int, shard_size: int, seed: int) -> np.ndarray:
    """The fp32 vectors every cache was built from: (records, captions, dim)."""
    parts = [llm_like_embeddings(min(shard_size, records - s) * len(CAPTIONS), dim, seed=seed,
                                 rows_seed=s // shard_size) for s in range(0, records, shard_size)]
    return np.concatenate(parts).reshape(records, len(CAPTIONS), dim)


def _pick(keys: list[str], batch: int, rng: np.random.Generator) -> list[str]:
    """``batch`` distinct random keys: a shuffled loader's batch."""
    return [keys[i] for i in rng.choice(len(keys), size=batch, replace=False)]


def measure_dtype(folder: Path, dtype: str, ref: np.ndarray, batches: list[int], reps: int,
                  seed: int) -> list[dict]:
    from llm2clip_fast.data.embedding_cache import EmbeddingCache

    records = ref.shape[0]
    files = sorted(p for p in folder.glob("shard-*") if p.suffix == ".npy")
    data_bytes = sum(p.stat().st_size for p in files)
    all_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    cache = EmbeddingCache.open(folder, verify="size")
    keys = cache.keys()
    every = np.stack([cache.lookup(keys, c).numpy() for c in CAPTIONS], axis=1)
    quality = fidelity(every.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    del every, cache
    gc.collect()
    rng = np.random.default_rng(seed)
    rows = []
    for wanted in batches:
        batch = min(wanted, records)
        for f in files:  # warm: every byte of the shards read once
            with open(f, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        cache = EmbeddingCache.open(folder, verify="size")
        cache.lookup(_pick(keys, batch, rng), "long")
        warm = []
        for _ in range(max(3, reps)):
            chosen = _pick(keys, batch, rng)
            t0 = time.perf_counter()
            cache.lookup(chosen, "long")
            warm.append(time.perf_counter() - t0)
        del cache  # a live mapping would keep its pages resident
        gc.collect()
        cold, resident = [], []
        for _ in range(reps):
            resident.append(make_cold(files))
            cache = EmbeddingCache.open(folder, verify="size")
            chosen = _pick(keys, batch, rng)
            t0 = time.perf_counter()
            cache.lookup(chosen, "long")
            cold.append(time.perf_counter() - t0)
            del cache
            gc.collect()
        warm_s, cold_s = float(np.median(warm)), float(np.median(cold))
        # Key order is the report's column order (bench/report.py shows the first 12).
        rows.append({"dtype": dtype, "batch": batch,
                     "bytes_per_caption": data_bytes / (records * len(CAPTIONS)),
                     "warm_emb_per_s": batch / warm_s, "cold_emb_per_s": batch / cold_s,
                     "cold_resident_fraction": max(resident), **quality,
                     "warm_ms": warm_s * 1e3, "cold_ms": cold_s * 1e3, "status": "ok",
                     "all_files_bytes_per_caption": all_bytes / (records * len(CAPTIONS)),
                     "records": records, "dim": ref.shape[-1], "cold_reps": reps})
    return rows


def run(args: argparse.Namespace) -> int:
    from llm2clip_fast.data.embedding_int8 import absmax_int8_roundtrip

    records = args.records or (600 if args.quick else 20_000)
    dim = args.dim or (256 if args.quick else 4096)
    shard_size = args.shard_size or (256 if args.quick else 5_000)
    batches = [int(b) for b in (args.batches or ("256,64" if args.quick else "4096,512")).split(",")]
    reps = args.reps or (2 if args.quick else 5)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    work = Path(tempfile.mkdtemp(prefix="cache_bench_", dir=args.workdir))
    rows = []
    try:
        ref = reference(records, dim, shard_size, args.seed)
        flat = ref.reshape(-1, dim)
        baseline = {"dtype": "int8-absmax", "batch": None, "bytes_per_caption": dim + 4.0,
                    **fidelity(np.concatenate([absmax_int8_roundtrip(flat[i:i + 8192])
                                               for i in range(0, len(flat), 8192)]), flat),
                    "status": "ok", "records": records,
                    "dim": dim}
        del flat
        for dtype in dtypes:
            folder = work / dtype
            t0 = time.perf_counter()
            build_cache(folder, dtype, records, dim, shard_size, args.seed)
            print(f"  {dtype}: cache written in {time.perf_counter() - t0:.1f}s", flush=True)
            for row in measure_dtype(folder, dtype, ref, batches, reps, args.seed):
                row["shard_size"] = shard_size
                rows.append(row)
            shutil.rmtree(folder)
        rows.append(baseline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cols = ["dtype", "batch", "bytes_per_caption", "warm_emb_per_s", "cold_emb_per_s",
            "cold_resident_fraction", "warm_ms", "cold_ms", "cos_mean", "cos_min", "centred_cos_mean",
            "centred_cos_min", "status"]
    print_table(rows, cols, title=f"embedding-cache reader: {records} records x {len(CAPTIONS)} captions x "
                                  f"{dim} dims, LLM-like vectors, lookup of random keys")
    path = write_json(args.out, {"bench": "cache_throughput", "records": records, "dim": dim,
                                 "captions": len(CAPTIONS), "shard_size": shard_size,
                                 "workdir": str(Path(args.workdir or tempfile.gettempdir()).resolve()),
                                 "machine": machine_description(), "rows": rows})
    print(f"wrote {path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=None, help="records per cache (20000; 600 --quick)")
    parser.add_argument("--dim", type=int, default=None, help="embedding size (4096; 256 --quick)")
    parser.add_argument("--shard-size", type=int, default=None, help="records per shard (5000; 256 --quick)")
    parser.add_argument("--batches", default=None,
                        help="comma-separated lookup batch sizes (4096,512: the recipe's global batch and "
                             "one of 8 ranks' share; 256,64 --quick)")
    parser.add_argument("--reps", type=int, default=None, help="cold batches per point (5; 2 --quick)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp32,fp16,int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where the caches are written (default: the temp folder); put it on the "
                             "disk the real cache lives on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/cache_throughput.json")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
