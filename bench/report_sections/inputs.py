"""The report's inputs: every bench JSON under the input folders, recognised by its content."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

OK = "ok"
# The script (and flags) that writes each kind, for error messages.
SCRIPTS = {
    "loss_clip": "loss_throughput.py",
    "loss_siglip": "loss_throughput.py --loss siglip",
    "distributed": "distributed_memory.py",
    "adapter": "adapter_throughput.py",
    "embed": "embed_throughput.py",
    "train1": "train_throughput.py --stage 1",
    "stage2": "stage2_throughput.py",
}


class ReportInputError(ValueError):
    """A bench JSON that cannot be read, or lacks what its bench script always writes; names the file."""


@dataclass
class BenchFile:
    """One bench JSON: where it came from, what it is and its content."""

    path: Path
    kind: str
    data: dict[str, Any]
    note: str = ""  # said on every plot made from this file (e.g. "measured under load")

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data.get("rows", [])


@dataclass
class Section:
    """One part of report.md: a heading, its markdown body and the plots it made."""

    title: str
    body: str
    plots: list[Path]


def status(row: dict[str, Any]) -> str:
    """A row's status; rows without one were measured (ok)."""
    return str(row.get("status", OK))


def read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportInputError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc


def classify(data: dict[str, Any]) -> str:
    """The bench a JSON object came from, by the keys each script writes; "other" if none matches."""
    bench = data.get("bench")
    schema = data.get("schema")
    if bench == "gpu_check" or (isinstance(schema, str) and schema.startswith("llm2clip_fast.gpu_check")):
        return "gpu_check"
    named = {"adapter_throughput": "adapter", "stage2_throughput": "stage2"}
    if bench in named:
        return named[bench]
    if bench == "train_throughput" and data.get("stage") == 1:
        return "train1"
    return _classify_by_keys(bench, data)


def _classify_by_keys(bench: Any, data: dict[str, Any]) -> str:
    # The scripts below write no "bench" key today; accept one with their name if they gain it.
    if (
        bench in (None, "loss_throughput")
        and "flops_convention" in data
        and data.get("loss") in ("clip", "siglip")
    ):
        return "loss_" + data["loss"]
    if bench in (None, "distributed_memory") and "world" in data and "summary" in data and "rows" in data:
        return "distributed"
    rows = data.get("rows")
    first = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
    args = data.get("args")
    if (
        bench in (None, "embed_throughput")
        and isinstance(args, dict)
        and ("mode" in first or "modes" in args)
    ):
        return "embed"
    return "other"


def load_inputs(folders: Sequence[Path]) -> tuple[list[BenchFile], list[Path]]:
    """Every bench JSON under ``folders`` (classified) and the gpu_check folders (those with summary.md).

    JSON files inside a gpu_check folder that no other reader recognises belong to gpu_check.
    """
    files: list[BenchFile] = []
    gpu_dirs: list[Path] = []
    seen: set[Path] = set()
    for folder in folders:
        if not folder.is_dir():
            raise ReportInputError(f"--in {folder}: not a folder")
        gpu_dirs += sorted(p.parent for p in folder.rglob("summary.md"))
        for path in sorted(folder.rglob("*.json")):
            if path.resolve() in seen or path.name.startswith("."):
                continue
            seen.add(path.resolve())
            files.append(_bench_file(path, gpu_dirs))
    return files, sorted(set(gpu_dirs))


def _bench_file(path: Path, gpu_dirs: list[Path]) -> BenchFile:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    kind = classify(data)
    if kind == "other" and (
        path.name.startswith("gpu_check") or any(g == path.parent or g in path.parents for g in gpu_dirs)
    ):
        kind = "gpu_check"
    return BenchFile(path, kind, data)


def require(bf: BenchFile, keys: Iterable[str], *, ok_rows_need: Iterable[str] = ()) -> None:
    """Raise if the file lacks a key its bench script always writes (top level, or in every ok row)."""
    script = SCRIPTS.get(bf.kind, bf.kind)
    for key in keys:
        if key not in bf.data:
            raise ReportInputError(f"{bf.path}: looks like bench/{script} output but lacks the key {key!r}")
    if not isinstance(bf.data.get("rows", []), list):
        raise ReportInputError(f"{bf.path}: 'rows' must be a list")
    needed = list(ok_rows_need)
    for i, row in enumerate(bf.rows):
        if not isinstance(row, dict):
            raise ReportInputError(f"{bf.path}: rows[{i}] is not an object")
        if status(row) != OK:
            continue
        missing = [k for k in needed if row.get(k) is None]
        if missing:
            raise ReportInputError(
                f"{bf.path}: rows[{i}] (status ok) lacks {missing}, which bench/{script} "
                "writes for every measured point"
            )


def machine_label(bf: BenchFile) -> tuple[str, str]:
    """(short name for a title, one line with hardware, libraries and date for a plot's foot)."""
    m = bf.data.get("machine") if isinstance(bf.data.get("machine"), dict) else {}
    short, hardware = _hardware(m)
    libs = m.get("libraries") if isinstance(m.get("libraries"), dict) else {"torch": m.get("torch")}
    shown = ", ".join(
        f"{k} {v}" for k, v in libs.items() if v and k in ("torch", "triton", "transformers", "bitsandbytes")
    )
    if m.get("date_utc"):
        date = str(m["date_utc"])[:10]
    else:
        mtime = datetime.fromtimestamp(bf.path.stat().st_mtime, tz=timezone.utc)
        date = mtime.strftime("%Y-%m-%d") + " (file time)"
    commit = f", commit {m['git_commit']}" if m.get("git_commit") else ""
    return short, f"{hardware} | {shown or 'library versions not recorded'} | {date}{commit}"


def _hardware(m: dict[str, Any]) -> tuple[str, str]:
    """(short name, hardware line): the GPU and CUDA, or the CPU model, threads and flags."""
    if m.get("gpu"):
        short = str(m["gpu"])
        return short, short + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
    cpu = m.get("cpu_model") or "CPU (model not recorded)"
    cores = m.get("torch_threads") or m.get("cpu_count")
    short = f"{cpu}, {cores} threads" if cores else cpu
    flags = m.get("cpu_flags")
    return short, short + (f" [{' '.join(flags)}]" if flags else "")


def without_commit(label: str) -> str:
    return re.sub(r", commit \w+$", "", label)


def plot_label(bf: BenchFile) -> tuple[str, str]:
    """machine_label with the report's note (if any) in front of the foot line."""
    short, foot = machine_label(bf)
    return short, (f"{bf.note} | " if bf.note else "") + foot
