"""The caption-embedding cache: the frozen LLM's embeddings, computed once, memory-mapped by stage 2.

Layout of a cache folder::

    cache_settings.json        what every shard was built with (checked when a run resumes)
    shard-00000.npy            (records, captions, dim) fp16/fp32/int8, row r = r-th record of the shard
    shard-00000.scales.npy     int8 only: (records, captions) float32 per-row scales
    shard-00000.stats.npy      int8 only: (2, captions, dim) float32 per-column offset and scale
    shard-00000.keys.json      the shard's record keys, in row order
    shard-00000.captions.json  per record and caption, a short hash of the caption text encoded
    shard-00000.done.json      written last: the shard is complete; sha256 of its files and the
                               fingerprint of its inputs (caption texts, encoder)
    ...
    manifest.json              written last of all: dim, dtype, caption names, shard list + checksums,
                               the encoder fingerprint and the keys skipped (empty caption) at embed time

Shard ``i`` holds records ``[i * shard_size, (i + 1) * shard_size)`` of the source's caption order,
so boundaries are the same in every run. :func:`build_embedding_cache` skips shards whose
``done.json`` matches the current keys, caption texts (``captions_sha256``) and encoder
(``encoder_sha256``: the weights' hash and encoding settings) and whose data checksum holds, and
redoes any other (a partial shard leaves at most temp files, never a half-written ``.npy`` under its
final name); changed inputs are reported through the hook. It gives shard ``i`` to rank
``i % world_size`` and lets rank 0 merge the ``done`` records into the manifest.

With ``dtype="int8"`` (:mod:`llm2clip_fast.data.embedding_int8`) a value takes one byte instead of
two, plus 4 bytes per embedding; :meth:`EmbeddingCache.lookup` dequantises, so readers see float32
as for the other dtypes. An int8 cache is format version 2 (older readers refuse it by its version);
fp16/fp32 caches are still written as version 1, byte for byte as before, and both versions are read.

A consumer checks that a cache was built from its data with :meth:`EmbeddingCache.check_captions`,
which names the first key whose caption text differs. Caches written before caption fingerprints
existed stay readable (``has_caption_fingerprints`` is False); rerunning embed on them re-encodes them.

:class:`EmbeddingCache` opens a finished cache, verifies the checksums and memory-maps the shards, so
stage 2 reads embeddings without ever loading the LLM.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_files import write_stream_atomic
from ..redaction import redact_value
from .embedding_int8 import Int8Shard, dequantize_rows, quantize_shard

CACHE_FORMAT = "llm2clip_fast.embedding_cache"
CACHE_VERSION = 1  # fp16/fp32 caches: unchanged since version 1, so older readers still read them
INT8_CACHE_VERSION = 2  # adds the int8 shards' scales and statistics files
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SETTINGS_NAME = "cache_settings.json"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}
_STORAGE_ALIASES = {
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "int8": "int8",
}
# Files of an int8 shard besides the int8 array: (done/manifest key prefix, file suffix).
_INT8_PARTS = (("scales", ".scales.npy"), ("stats", ".stats.npy"))
_HASH_CHUNK = 1 << 22


class CacheCorruptError(ValueError):
    """A cache file is missing, truncated or does not match its recorded checksum."""


class StaleCacheError(ValueError):
    """The cache was built from other captions than the data's (rerun the embed step)."""


def _read_shard_hashes(path: Path, shard: dict[str, Any], verify: bool) -> list[list[str]]:
    if not path.is_file():
        raise CacheCorruptError(f"cache file {path} is missing")
    if verify and sha256_file(path) != shard["captions_sha256"]:
        raise CacheCorruptError(f"cache captions file {path} is corrupt (sha256 mismatch)")
    hashes = _read_json(path, "cache captions file").get("hashes")
    if not isinstance(hashes, list) or len(hashes) != shard["records"]:
        raise CacheCorruptError(f"{path} does not hold {shard['records']} records' caption hashes")
    return hashes


def storage_dtype_name(dtype: str | torch.dtype | np.dtype) -> str:
    """Canonical storage dtype name (``"float16"``, ``"float32"`` or ``"int8"``) of ``dtype``."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        dtype = np.dtype(dtype).name
    name = _STORAGE_ALIASES.get(str(dtype).lower()) if isinstance(dtype, str) else None
    if name is None:
        raise ValueError(f"cache dtype must be fp16, fp32 or int8, got {dtype!r}")
    return name


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_json(path: Path, data: Any) -> None:
    payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    write_stream_atomic(path, lambda f: f.write(payload))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"{what} {path} is unreadable: {exc}") from exc


def _keys_sha256(keys: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(keys)).encode()).hexdigest()


def caption_hash(text: str) -> str:
    """Short (48-bit) hash of one caption text: enough to tell a changed caption, cheap to store."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


def _captions_payload(batch: Sequence[tuple[str, dict[str, str]]], names: Sequence[str]) -> bytes:
    return json.dumps({"caption_names": list(names),
                       "hashes": [[caption_hash(caps[n]) for n in names] for _, caps in batch]}).encode()


def fingerprint_sha256(fingerprint: dict[str, Any] | None) -> str | None:
    """Hash of an encoder fingerprint (weights' hash + encoding settings); None when there is none."""
    if fingerprint is None:
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


_ENCODER_FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".txt", ".model",
                          ".tiktoken"}


def weights_fingerprint(*folders: str | os.PathLike | None) -> dict[str, str]:
    """SHA-256 of every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``),
    config and tokenizer file (``*.json``, ``*.txt``, ``*.model``, ``*.tiktoken``) under the given
    model/adapter folders, keyed by relative path: what makes an encoder produce the embeddings it
    does, so a replaced model at the same path is noticed."""
    out: dict[str, str] = {}
    for i, folder in enumerate(f for f in folders if f is not None):
        root = Path(folder)
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix in _ENCODER_FILE_SUFFIXES)
        for f in files:
            out[f"{i}/{f.relative_to(root) if f != root else f.name}"] = sha256_file(f)
    return out


# ---------------------------------------------------------------------------------------- writing
def _settings(
    dim: int, dtype: str, caption_names: Sequence[str], shard_size: int, metadata: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "version": INT8_CACHE_VERSION if dtype == "int8" else CACHE_VERSION,
        "dim": int(dim),
        "dtype": dtype,
        "caption_names": list(caption_names),
        "shard_size": int(shard_size),
        "metadata": metadata,
    }


def _check_or_write_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS_NAME
    if path.is_file():
        # A cache written before sources were saved redacted: its source compares by its redacted form.
        old = redact_value(_read_json(path, "cache settings"))
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds a cache built with different settings ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} } there, { {k: settings.get(k) for k in diff} } now); "
                "use another --out folder or delete it"
            )
        return
    # Every rank may get here first; they write identical content, and the rename is atomic.
    _atomic_write_json(path, settings)


def _shard_state(out: Path, index: int, keys: Sequence[str], captions_sha256: str,
                 encoder_sha256: str | None) -> str:
    """``"done"`` when shard ``index`` was finished for exactly these keys, caption texts and encoder
    and its checksums hold; ``"captions changed"`` / ``"encoder changed"`` when a finished shard's
    inputs differ now; ``"missing"`` otherwise (not written, damaged, or from before fingerprints)."""
    stem = shard_stem(index)
    done_path = out / f"{stem}.done.json"
    if not done_path.is_file():
        return "missing"
    try:
        done = json.loads(done_path.read_text())
        if done["records"] != len(keys) or done["keys_sha256"] != _keys_sha256(keys):
            return "missing"
        if "captions_sha256" not in done:
            return "missing"  # written before caption fingerprints: cannot tell, so redo it
        if done["captions_sha256"] != captions_sha256:
            return "captions changed"
        if done.get("encoder_sha256") != encoder_sha256:
            return "encoder changed"
        data = out / done["file"]
        intact = (
            data.is_file()
            and sha256_file(data) == done["sha256"]
            and sha256_file(out / done["keys_file"]) == done["keys_file_sha256"]
            and sha256_file(out / done["captions_file"]) == done["captions_sha256"]
            and all(sha256_file(out / done[f"{part}_file"]) == done[f"{part}_sha256"]
                    for part, _ in _INT8_PARTS if f"{part}_file" in done)
        )
        return "done" if intact else "missing"
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return "missing"  # anything unreadable is simply redone


def _write_shard(out: Path, index: int, keys: list[str], array: np.ndarray | Int8Shard,
                 captions_payload: bytes, encoder_sha256: str | None) -> dict[str, Any]:
    stem = shard_stem(index)
    # The done record goes first so that a kill between files never leaves a stale "done" claim.
    (out / f"{stem}.done.json").unlink(missing_ok=True)
    data_path, keys_path = out / f"{stem}.npy", out / f"{stem}.keys.json"
    extra: dict[str, Any] = {}
    if isinstance(array, Int8Shard):
        for (part, suffix), values in zip(_INT8_PARTS, (array.row_scale, array.stats)):
            path = out / f"{stem}{suffix}"
            write_stream_atomic(path, lambda f, v=values: np.save(f, v, allow_pickle=False))
            extra.update({f"{part}_file": path.name, f"{part}_sha256": sha256_file(path)})
        array = array.values
    write_stream_atomic(data_path, lambda f: np.save(f, array, allow_pickle=False))
    keys_payload = json.dumps(keys).encode()
    write_stream_atomic(keys_path, lambda f: f.write(keys_payload))
    captions_path = out / f"{stem}.captions.json"
    write_stream_atomic(captions_path, lambda f: f.write(captions_payload))
    done = {
        "shard": index,
        "file": data_path.name,
        "keys_file": keys_path.name,
        "records": len(keys),
        "shape": list(array.shape),
        "sha256": sha256_file(data_path),
        "keys_file_sha256": hashlib.sha256(keys_payload).hexdigest(),
        "keys_sha256": _keys_sha256(keys),
        "captions_file": captions_path.name,
        "captions_sha256": hashlib.sha256(captions_payload).hexdigest(),
        "encoder_sha256": encoder_sha256,
        **extra,
    }
    _atomic_write_json(out / f"{stem}.done.json", done)
    return done


def _remove_temp_files(out: Path, index: int) -> None:
    """Temp files a killed run left for shard ``index`` (only its owner rank ever writes them)."""
    for tmp in out.glob(f".{shard_stem(index)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def build_embedding_cache(
    records: Iterable[tuple[str, dict[str, str]]],
    encode: Callable[[list[str]], torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    caption_names: Sequence[str],
    dim: int,
    dtype: str | torch.dtype = "float16",
    shard_size: int = 10_000,
    metadata: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    hook: Callable[[str, int], None] | None = None,
    fingerprint: dict[str, Any] | None = None,
    skipped: dict[str, str] | None = None,
    encoder_options: dict[str, Any] | None = None,
) -> Path | None:
    """Encode every caption of ``records`` into a sharded cache under ``out_dir`` (resumable).

    Args:
        records: ``(key, {caption name: text})`` in a deterministic order (e.g.
            ``source.iter_captions()``); every record must carry every name in ``caption_names``.
        encode: texts -> (N, dim) float tensor, row i the embedding of text i.
        caption_names: the captions to store, in column order.
        dim: embedding size. dtype: storage, ``"float16"``, ``"float32"`` or ``"int8"`` (per-row
            scaled, :mod:`~llm2clip_fast.data.embedding_int8`; read back as float32).
        shard_size: records per shard.
        metadata: JSON-able facts stored in the settings and manifest (model path, instruction...).
            A resumed run must pass the same ones.
        rank, world_size: this process's share: shard ``i`` belongs to rank ``i % world_size``.
        barrier: called once every shard of this rank is written (distributed: wait for the others)
            before rank 0 writes the manifest.
        hook: called as ``hook(event, shard)`` with ``"encoded"`` (before the shard is written),
            ``"written"``, ``"skipped"`` (reused as is), and ``"captions changed"`` / ``"encoder
            changed"`` (a finished shard whose inputs differ now, before it is re-encoded); for
            progress reports and tests that stop a run midway.
        fingerprint: what makes the encoder (weights' hashes, encoding settings; JSON-able). Shards
            written with another fingerprint are re-encoded. Stored in the manifest.
        skipped: ``{key: reason}`` of records the caller left out (e.g. an empty caption), stored in
            the manifest so consumers can tell them from keys missing by mistake. Read when the
            manifest is written, so it may be filled while ``records`` is consumed.
        encoder_options: encoder settings that change the vectors but not the cache's layout (the
            forward's precision, 8-bit quantisation): added to the manifest's metadata, but unlike
            ``metadata`` not checked against the folder's settings: a change re-encodes the shards
            through ``fingerprint`` instead of refusing the folder.

    Returns the manifest path on rank 0, ``None`` on other ranks.
    """
    names = _check_cache_arguments(caption_names, dim=dim, shard_size=shard_size, rank=rank,
                                   world_size=world_size)
    storage = storage_dtype_name(dtype)
    meta = dict(metadata or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_settings(out, _settings(dim, storage, names, shard_size, meta))
    writer = _ShardWriter(out, encode, names, dim, storage, fingerprint_sha256(fingerprint), hook)
    n_records = n_shards = 0
    for index, batch in _record_shards(records, names, shard_size):
        if index % world_size == rank:
            writer.write_or_skip(index, batch)
        n_shards, n_records = index + 1, n_records + len(batch)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    manifest_meta = {**meta, **(encoder_options or {})}
    return _write_manifest(out, n_shards, n_records,
                           _settings(dim, storage, names, shard_size, manifest_meta), fingerprint,
                           dict(skipped or {}))


def _check_cache_arguments(caption_names: Sequence[str], *, dim: int, shard_size: int, rank: int,
                           world_size: int) -> list[str]:
    """The caption names as a list, after checking the cache's shape arguments; errors name them."""
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    names = list(caption_names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"caption_names must be distinct non-empty strings, got {names!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return names


def _record_shards(records: Iterable[tuple[str, dict[str, str]]], names: Sequence[str],
                   shard_size: int) -> Iterator[tuple[int, list[tuple[str, dict[str, str]]]]]:
    """``(shard index, its records)`` of every shard, checking each record on the way: a non-empty,
    unique key and every caption of ``names``."""
    seen: set[str] = set()
    batch: list[tuple[str, dict[str, str]]] = []
    n_records = n_shards = 0
    for key, captions in records:
        if not isinstance(key, str) or not key:
            raise ValueError(f"record {n_records}: key must be a non-empty str, got {key!r}")
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in the records: the cache index needs unique keys")
        seen.add(key)
        missing = [n for n in names if not isinstance(captions.get(n), str)]
        if missing:
            raise ValueError(f"record {key!r} lacks caption(s) {missing}; it has {sorted(captions)}")
        batch.append((key, captions))
        n_records += 1
        if len(batch) == shard_size:
            yield n_shards, batch
            n_shards += 1
            batch = []
    if batch:
        yield n_shards, batch


class _ShardWriter:
    """Encodes and writes one rank's shards, skipping those already finished for the same inputs."""

    def __init__(self, out: Path, encode: Callable[[list[str]], torch.Tensor], names: list[str], dim: int,
                 storage: str, encoder_sha256: str | None, hook: Callable[[str, int], None] | None) -> None:
        self.out, self.encode, self.names, self.dim = out, encode, names, dim
        self.storage, self.encoder_sha256, self.hook = storage, encoder_sha256, hook

    def _event(self, event: str, index: int) -> None:
        if self.hook:
            self.hook(event, index)

    def write_or_skip(self, index: int, batch: list[tuple[str, dict[str, str]]]) -> None:
        """Reuse shard ``index`` when it is finished for these keys, caption texts and encoder;
        otherwise (reporting changed inputs) encode its captions and write it."""
        keys = [k for k, _ in batch]
        captions_payload = _captions_payload(batch, self.names)
        state = _shard_state(self.out, index, keys, hashlib.sha256(captions_payload).hexdigest(),
                             self.encoder_sha256)
        if state == "done":
            self._event("skipped", index)
            return
        if state != "missing":
            self._event(state, index)
        _remove_temp_files(self.out, index)
        stored = self.encode_shard(index, batch)
        self._event("encoded", index)
        _write_shard(self.out, index, keys, stored, captions_payload, self.encoder_sha256)
        self._event("written", index)

    def encode_shard(self, index: int, batch: list[tuple[str, dict[str, str]]]) -> np.ndarray | Int8Shard:
        """The shard's (records, captions, dim) embeddings in the storage dtype (int8: quantised);
        an error when ``encode`` returns the wrong shape or a non-finite value."""
        names, dim, storage = self.names, self.dim, self.storage
        texts = [caps[n] for _, caps in batch for n in names]
        emb = self.encode(texts)
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != (len(texts), dim):
            raise ValueError(
                f"encode returned {getattr(emb, 'shape', type(emb).__name__)}, expected ({len(texts)}, {dim})"
            )
        array = emb.detach().to("cpu", torch.float32).reshape(len(batch), len(names), dim).numpy()
        if storage != "int8":
            with np.errstate(over="ignore"):  # overflow is reported below, with a hint
                array = array.astype(STORAGE_DTYPES[storage])
        if not np.isfinite(array).all():
            hint = " (values overflow float16: use dtype float32)" if storage == "float16" else ""
            raise ValueError(f"shard {index}: embeddings contain inf/nan{hint}")
        return quantize_shard(array) if storage == "int8" else array


def _write_manifest(out: Path, n_shards: int, n_records: int, settings: dict[str, Any],
                    fingerprint: dict[str, Any] | None, skipped: dict[str, str]) -> Path:
    shards = []
    for index in range(n_shards):
        done_path = out / f"{shard_stem(index)}.done.json"
        if not done_path.is_file():
            raise RuntimeError(
                f"shard {index} ({done_path.name}) is not finished: did every rank complete? Rerun to resume"
            )
        done = _read_json(done_path, "shard record")
        fields = ("file", "keys_file", "records", "shape", "sha256", "keys_file_sha256", "captions_file",
                  "captions_sha256", "encoder_sha256")
        optional = [f"{part}_{what}" for part, _ in _INT8_PARTS for what in ("file", "sha256")]
        shards.append({k: done[k] for k in fields} | {k: done[k] for k in optional if k in done})
    # A smaller source than last time leaves shards past the end: they are not part of this cache.
    for stale in out.glob("shard-*.done.json"):
        index = int(stale.name.split(".")[0].split("-")[1])
        if index >= n_shards:
            stem = shard_stem(index)
            for suffix in (".done.json", ".npy", ".keys.json", ".captions.json",
                           *(suffix for _, suffix in _INT8_PARTS)):
                (out / f"{stem}{suffix}").unlink(missing_ok=True)
    manifest = {
        **settings,
        "num_records": n_records,
        "num_rows": n_records * len(settings["caption_names"]),
        "shards": shards,
        "encoder_fingerprint": fingerprint,
        "skipped": skipped,
    }
    path = out / MANIFEST_NAME
    _atomic_write_json(path, manifest)
    return path


# ---------------------------------------------------------------------------------------- reading
def _advise_random(array: np.ndarray) -> None:
    """Stage 2 reads rows in shuffled order. Left to its default, the kernel reads ahead around every
    faulted page, mostly other rows: a cold batch of 512 random 4096-d rows took ~3x longer that way
    (bench/cache_throughput.py). Best effort: a mapping numpy does not expose is left as it is."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            mapping.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


def _open_int8_parts(folder: Path, shard: dict[str, Any], verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """An int8 shard's row scales (memory-mapped) and column statistics, checked like the shard."""
    records, captions, dim = shard["shape"]
    expected = {"scales": (records, captions), "stats": (2, captions, dim)}
    parts = []
    for part, _ in _INT8_PARTS:
        if f"{part}_file" not in shard:
            raise CacheCorruptError(f"the manifest lists no {part} file for int8 shard {shard['file']}")
        path = folder / shard[f"{part}_file"]
        if not path.is_file():
            raise CacheCorruptError(f"cache file {path} is missing")
        if verify and sha256_file(path) != shard[f"{part}_sha256"]:
            raise CacheCorruptError(f"cache {part} file {path} is corrupt or truncated (sha256 mismatch)")
        try:
            array = np.load(path, mmap_mode="r" if part == "scales" else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CacheCorruptError(f"cache {part} file {path} is unreadable or truncated: {exc}") from exc
        _advise_random(array)
        if array.shape != expected[part] or array.dtype != np.float32:
            raise CacheCorruptError(f"cache {part} file {path} holds {array.dtype} {list(array.shape)}, "
                                    f"expected float32 {list(expected[part])}")
        parts.append(array)
    return parts[0], parts[1]


def _open_shard(folder: Path, shard: dict[str, Any], verify: bool | str,
                expected_dtype: np.dtype) -> tuple[np.ndarray, list[str]]:
    """A manifest shard's memory-mapped array and its keys, checked as ``verify`` asks (sha256 of both
    files, or only the array's shape and dtype and the number of keys)."""
    data_path, keys_path = folder / shard["file"], folder / shard["keys_file"]
    for p in (data_path, keys_path):
        if not p.is_file():
            raise CacheCorruptError(f"cache file {p} is missing")
    if verify is True:
        if sha256_file(data_path) != shard["sha256"]:
            raise CacheCorruptError(f"cache shard {data_path} is corrupt or truncated (sha256 mismatch)")
        if sha256_file(keys_path) != shard["keys_file_sha256"]:
            raise CacheCorruptError(f"cache keys file {keys_path} is corrupt (sha256 mismatch)")
    try:
        array = np.load(data_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CacheCorruptError(f"cache shard {data_path} is unreadable or truncated: {exc}") from exc
    _advise_random(array)
    if list(array.shape) != list(shard["shape"]) or array.dtype != expected_dtype:
        raise CacheCorruptError(
            f"cache shard {data_path} holds {array.dtype} {list(array.shape)}, the manifest says "
            f"{expected_dtype} {shard['shape']}"
        )
    shard_keys = _read_json(keys_path, "cache keys file")
    if len(shard_keys) != shard["records"]:
        raise CacheCorruptError(f"{keys_path} lists {len(shard_keys)} keys, expected {shard['records']}")
    return array, shard_keys


class EmbeddingCache:
    """Read-only view of a finished cache; shards are memory-mapped, nothing of the LLM is needed.

    Open with :meth:`open`. ``dim`` (int), ``dtype`` (torch dtype of the stored arrays: float16,
    float32 or int8), ``caption_names``, ``metadata``; :meth:`keys` in source order, ``key in cache``,
    :meth:`lookup` and :meth:`get` return float32 tensors (int8 shards dequantised).
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        arrays: list[np.ndarray],
        index: dict[str, tuple[int, int]],
        keys: list[str],
        caption_hashes: list[list[list[str]]] | None = None,
        int8_params: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self._arrays = arrays
        self._index = index
        self._keys = keys
        self.dim: int = int(manifest["dim"])
        self.dtype: torch.dtype = getattr(torch, manifest["dtype"])
        self.caption_names: list[str] = list(manifest["caption_names"])
        self.metadata: dict[str, Any] = dict(manifest.get("metadata") or {})
        self.skipped: dict[str, str] = dict(manifest.get("skipped") or {})
        self._column = {n: i for i, n in enumerate(self.caption_names)}
        self._caption_hashes = caption_hashes
        # Per shard of an int8 cache: (row scales (records, captions), stats (2, captions, dim)).
        self._int8 = int8_params

    @property
    def has_caption_fingerprints(self) -> bool:
        """False for a cache written before caption fingerprints were recorded (rerun embed to add them)."""
        return self._caption_hashes is not None

    def check_captions(self, records: Iterable[tuple[str, dict[str, str]]],
                       caption_names: Sequence[str] | None = None) -> None:
        """Raise :class:`StaleCacheError` naming the first key whose caption text (for each of
        ``caption_names``, default all cached ones the record has) differs from the text the cache
        was built from. Keys the cache lacks are not checked here. Raises ``ValueError`` for a cache
        without fingerprints."""
        if self._caption_hashes is None:
            raise ValueError(f"the embedding cache {self.directory} predates caption fingerprints, so it "
                             "cannot be checked against the data; rerun the embed step on it to record them")
        names = list(self.caption_names if caption_names is None else caption_names)
        for key, captions in records:
            where = self._index.get(key)
            if where is None:
                continue
            stored = self._caption_hashes[where[0]][where[1]]
            for name in names:
                if name in captions and name in self._column and \
                        stored[self._column[name]] != caption_hash(captions[name]):
                    raise StaleCacheError(
                        f"the embedding cache {self.directory} was built from other captions: key {key!r}, "
                        f"caption {name!r} differs from the data's ({captions[name][:60]!r}); rerun the "
                        "embed step on this data to re-encode the changed shards")

    @classmethod
    def open(cls, directory: str | os.PathLike, *, verify: bool | str = True) -> EmbeddingCache:
        """Open the cache in ``directory``.

        ``verify=True`` checks every file's sha256 (reads every byte once); ``"size"`` only checks
        that each shard's array has its recorded shape (catches truncation, not bit flips);
        ``False`` checks nothing. A failed check raises :class:`CacheCorruptError` naming the file.
        """
        if verify not in (True, False, "size"):
            raise ValueError(f"verify must be True, False or 'size', got {verify!r}")
        folder = Path(directory)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            partial = any(folder.glob("shard-*.done.json")) if folder.is_dir() else False
            hint = (
                "the embed run did not finish; rerun it to resume" if partial else "run the embed step first"
            )
            raise FileNotFoundError(f"{folder} is not an embedding cache (no {MANIFEST_NAME}): {hint}")
        manifest = _read_json(path, "manifest")
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheCorruptError(f"{path} is not an llm2clip_fast embedding-cache manifest")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise CacheCorruptError(
                f"{path}: cache version {manifest.get('version')}, this reader reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        if manifest.get("dtype") not in STORAGE_DTYPES:
            raise CacheCorruptError(f"{path}: unknown storage dtype {manifest.get('dtype')!r}")
        int8 = manifest["dtype"] == "int8"
        if int8 and manifest["version"] < INT8_CACHE_VERSION:
            raise CacheCorruptError(f"{path}: an int8 cache must be version {INT8_CACHE_VERSION}")
        int8_params: list[tuple[np.ndarray, np.ndarray]] | None = [] if int8 else None
        arrays: list[np.ndarray] = []
        index: dict[str, tuple[int, int]] = {}
        keys: list[str] = []
        hashes: list[list[list[str]]] | None = [] if all("captions_file" in sh for sh in manifest["shards"]) \
            else None
        expected_dtype = np.dtype(STORAGE_DTYPES[manifest["dtype"]])
        for s, shard in enumerate(manifest["shards"]):
            array, shard_keys = _open_shard(folder, shard, verify, expected_dtype)
            keys_path = folder / shard["keys_file"]
            for row, key in enumerate(shard_keys):
                if key in index:
                    raise CacheCorruptError(f"key {key!r} appears twice (in {keys_path})")
                index[key] = (s, row)
            keys.extend(shard_keys)
            arrays.append(array)
            if hashes is not None:
                hashes.append(_read_shard_hashes(folder / shard["captions_file"], shard, verify is True))
            if int8_params is not None:
                int8_params.append(_open_int8_parts(folder, shard, verify is True))
        return cls(folder, manifest, arrays, index, keys, hashes, int8_params)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        """Record keys in source order."""
        return list(self._keys)

    def lookup(self, keys: Sequence[str], caption_name: str) -> torch.Tensor:
        """Embeddings of caption ``caption_name`` of each key: (len(keys), dim) float32.

        Raises ``KeyError`` listing the keys that are not in the cache (and for an unknown caption name).
        """
        if isinstance(keys, str):
            raise TypeError("keys must be a list of str, got a single str (wrap it in a list)")
        if caption_name not in self._column:
            raise KeyError(f"caption {caption_name!r} is not in the cache; it has {self.caption_names}")
        keys = list(keys)
        missing = [k for k in keys if k not in self._index]
        if missing:
            shown = ", ".join(repr(k) for k in missing[:10]) + (
                f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            )
            raise KeyError(f"{len(missing)} key(s) not in the embedding cache {self.directory}: {shown}")
        col = self._column[caption_name]
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        if keys:
            where = np.array([self._index[k] for k in keys], dtype=np.int64).reshape(-1, 2)
            for s in np.unique(where[:, 0]):
                sel = np.nonzero(where[:, 0] == s)[0]
                rows = self._arrays[int(s)][where[sel, 1], col]
                if self._int8 is not None:
                    row_scale, stats = self._int8[int(s)]
                    rows = dequantize_rows(rows, row_scale[where[sel, 1], col], stats[0, col], stats[1, col])
                out[sel] = rows
        return torch.from_numpy(out)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """Every caption embedding of ``key``: ``{caption name: (dim,) float32}``."""
        if key not in self._index:
            raise KeyError(f"key {key!r} is not in the embedding cache {self.directory}")
        s, row = self._index[key]
        rows = np.asarray(self._arrays[s][row], dtype=np.float32)
        if self._int8 is not None:
            row_scale, stats = self._int8[s]
            rows = rows * np.asarray(row_scale[row], dtype=np.float32)[:, None] * stats[1] + stats[0]
        return {n: torch.from_numpy(rows[i].copy()) for i, n in enumerate(self.caption_names)}

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache({str(self.directory)!r}, records={len(self)}, dim={self.dim}, "
            f"dtype={self.manifest['dtype']}, captions={self.caption_names})"
        )
