"""One benchmark report: ``report.md`` plus PNG plots from the JSON the ``bench/`` scripts write.

    python bench/report.py --in bench/results --out report/       # report what was measured
    python bench/report.py --quick --out /tmp/report               # run every bench --quick, then report

Reads every ``*.json`` under each ``--in`` folder (recursively) and recognises it by its content:

- ``loss_throughput.py`` (CLIP and ``--loss siglip``): fwd+bwd time and peak memory against B (log-log),
  one line per provider, OOM/error points marked; achieved TFLOP/s against B with the measured matmul
  rate as the roofline; one figure per (loss, device, dtype, D);
- ``distributed_memory.py``: the worst rank's peak memory against the global batch, one line per
  (provider, ranks);
- ``adapter_throughput.py``: fwd+bwd time, activation memory and fidelity, lean vs eager vs compiled;
- ``embed_throughput.py``: captions/s, weight memory and fidelity per precision and 8-bit mode;
- ``train_throughput.py --stage 1`` and ``stage2_throughput.py``: step throughput and step memory;
- ``gpu_check.py``: its ``summary.md`` verbatim and a line per stage JSON (schema-tolerant);
- any other bench JSON with a ``rows`` list (e.g. a cache bench): a table.

Each plot names the machine (CPU model and flags or GPU name, library versions) and the date. A section
whose JSON is absent is skipped with a line saying what was not found; a file that is not valid JSON,
or a recognised file that lacks what its bench always writes, is an error naming the file.
``--quick`` first runs each bench script with ``--quick`` (into ``OUT/results``), so CI exercises the
whole path from measurement to report; it exits 1 if a bench failed, after writing the report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

BENCH_DIR = Path(__file__).resolve().parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OK = "ok"
FAILED_MARK = "X"
# One colour per provider across every plot, so "fused" is the same blue everywhere.
COLOURS = {
    "fused": "tab:blue",
    "fused-torch": "tab:green",
    "materialised": "tab:red",
    "materialised-compiled": "tab:orange",
    "materialised-1gemm": "tab:brown",
    "materialised-1gemm-compiled": "tab:pink",
    "fused-recompute": "tab:cyan",
    "inf-cl": "tab:olive",
    "siglip-kernel": "tab:olive",
    "eager": "tab:red",
    "compile": "tab:orange",
    "plain": "tab:red",
    "global-clip": "tab:blue",
    "openclip-clip": "tab:red",
    "global-siglip": "tab:cyan",
    "openclip-siglip": "tab:pink",
    "fp32": "tab:gray",
    "bf16": "tab:blue",
    "int8": "tab:green",
}
_FALLBACK_COLOURS = ["tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray"]
MEMORY_FLOOR_MB = 0.1  # peak-RSS growth below this is not measurable (page granularity, allocator reuse)


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


# ---------------------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> Any:
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
    rows = data.get("rows")
    first = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
    schema = data.get("schema")
    if bench == "gpu_check" or (isinstance(schema, str) and schema.startswith("llm2clip_fast.gpu_check")):
        return "gpu_check"
    if bench == "adapter_throughput":
        return "adapter"
    if bench == "train_throughput" and data.get("stage") == 1:
        return "train1"
    if bench == "stage2_throughput":
        return "stage2"
    # The scripts below write no "bench" key today; accept one with their name if they gain it.
    if (
        bench in (None, "loss_throughput")
        and "flops_convention" in data
        and data.get("loss") in ("clip", "siglip")
    ):
        return "loss_" + data["loss"]
    if bench in (None, "distributed_memory") and "world" in data and "summary" in data and "rows" in data:
        return "distributed"
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
            data = _read_json(path)
            if not isinstance(data, dict):
                raise ReportInputError(
                    f"{path}: expected a JSON object at the top, got {type(data).__name__}"
                )
            kind = classify(data)
            if kind == "other" and (
                path.name.startswith("gpu_check")
                or any(g == path.parent or g in path.parents for g in gpu_dirs)
            ):
                kind = "gpu_check"
            files.append(BenchFile(path, kind, data))
    return files, sorted(set(gpu_dirs))


def _require(bf: BenchFile, keys: Iterable[str], *, ok_rows_need: Iterable[str] = ()) -> None:
    """Raise if the file lacks a key its bench script always writes (top level, or in every ok row)."""
    script = {
        "loss_clip": "loss_throughput.py",
        "loss_siglip": "loss_throughput.py --loss siglip",
        "distributed": "distributed_memory.py",
        "adapter": "adapter_throughput.py",
        "embed": "embed_throughput.py",
        "train1": "train_throughput.py --stage 1",
        "stage2": "stage2_throughput.py",
    }.get(bf.kind, bf.kind)
    for key in keys:
        if key not in bf.data:
            raise ReportInputError(f"{bf.path}: looks like bench/{script} output but lacks the key {key!r}")
    if not isinstance(bf.data.get("rows", []), list):
        raise ReportInputError(f"{bf.path}: 'rows' must be a list")
    needed = list(ok_rows_need)
    for i, row in enumerate(bf.rows):
        if not isinstance(row, dict):
            raise ReportInputError(f"{bf.path}: rows[{i}] is not an object")
        if row.get("status", OK) != OK:
            continue
        missing = [k for k in needed if row.get(k) is None]
        if missing:
            raise ReportInputError(
                f"{bf.path}: rows[{i}] (status ok) lacks {missing}, which bench/{script} "
                "writes for every measured point"
            )


# ---------------------------------------------------------------------------------------------------------
# Machine labels


def machine_label(bf: BenchFile) -> tuple[str, str]:
    """(short name for a title, one line with hardware, libraries and date for a plot's foot)."""
    m = bf.data.get("machine") if isinstance(bf.data.get("machine"), dict) else {}
    if m.get("gpu"):
        short = str(m["gpu"])
        hardware = short + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
    else:
        cpu = m.get("cpu_model") or "CPU (model not recorded)"
        cores = m.get("torch_threads") or m.get("cpu_count")
        short = f"{cpu}, {cores} threads" if cores else cpu
        flags = m.get("cpu_flags")
        hardware = short + (f" [{' '.join(flags)}]" if flags else "")
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


def _without_commit(label: str) -> str:
    return re.sub(r", commit \w+$", "", label)


def _plot_label(bf: BenchFile) -> tuple[str, str]:
    """machine_label with the report's note (if any) in front of the foot line."""
    short, foot = machine_label(bf)
    return short, (f"{bf.note} | " if bf.note else "") + foot


# ---------------------------------------------------------------------------------------------------------
# Plot helpers


def _colour(name: str, palette: dict[str, str]) -> str:
    if name in COLOURS:
        return COLOURS[name]
    if name not in palette:
        palette[name] = _FALLBACK_COLOURS[len(palette) % len(_FALLBACK_COLOURS)]
    return palette[name]


FOOT_FONTSIZE = 7


def _figure(ncols: int, title: str, foot: str, width: float = 5.2, height: float = 4.2):
    """A row of ``ncols`` axes under ``title``; ``foot`` (machine, versions, date) wrapped at the bottom."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    fig.suptitle(title, fontsize=12)
    chars_per_line = int(width * ncols * 72 / (FOOT_FONTSIZE * 0.6))  # ~0.6 em per character
    fig.text(
        0.5,
        0.01,
        textwrap.fill(foot, chars_per_line),
        ha="center",
        va="bottom",
        fontsize=FOOT_FONTSIZE,
        color="dimgray",
    )
    return fig, list(axes[0])


def _save(fig, out_dir: Path, name: str, used: set[str]) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    path = out_dir / f"{candidate}.png"
    foot_lines = fig.texts[0].get_text().count("\n") + 1 if fig.texts else 0
    foot_inches = foot_lines * FOOT_FONTSIZE * 1.3 / 72 + 0.1
    fig.tight_layout(rect=(0, foot_inches / fig.get_figheight(), 1, 0.97))
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{candidate}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def _plain_number(v: float) -> str:
    """A tick label without powers of ten: 0.05, 3, 250, 16k, 1.2M."""
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


class _PlainLogFormatter(LogFormatter):
    """Matplotlib's choice of which log ticks to label, written as plain numbers."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return _plain_number(x) if super().__call__(x, pos) else ""


def _log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _batch_x(ax, batches: Sequence[int], label: str = "batch size B (log scale)") -> None:
    """Log-2 x axis labelled exactly at the measured batch sizes."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(batches))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(v):,}"))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 5:
        ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(label)


def _mark_failures(ax, failures: Sequence[tuple[float, str, str]], top: float) -> None:
    """Failed points (x, status, colour) as crosses on a line above the measured values.

    Call after the axis scales are set: it raises the (log) y limit to leave room for the labels.
    """
    for x, status, colour in failures:
        ax.plot([x], [top], marker=FAILED_MARK, markersize=10, color=colour, linestyle="none")
        ax.annotate(
            status, (x, top), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7, color=colour
        )
    if failures:
        ax.set_ylim(top=top * 4)


def _failure_handle() -> Line2D:
    return Line2D(
        [],
        [],
        marker=FAILED_MARK,
        color="black",
        linestyle="none",
        markersize=8,
        label="not measured (OOM / error / timeout)",
    )


def _grouped_bars(
    ax,
    categories: Sequence[str],
    series: dict[str, list[float | str | None]],
    ylabel: str,
    palette: dict[str, str],
    *,
    log: bool = False,
    hatches: dict[str, str] | None = None,
    colours: dict[str, str] | None = None,
) -> None:
    """Bars per category, one per series; a string value (a failure status) is written where the bar is."""
    n = max(1, len(series))
    width = 0.8 / n
    positive = [v for vals in series.values() for v in vals if isinstance(v, (int, float)) and v > 0]
    base = (min(positive) / 3) if (log and positive) else 0
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(categories))]
        colour = (colours or {}).get(name) or _colour(name.split(" ")[0], palette)
        heights = [v if isinstance(v, (int, float)) and v > 0 else 0 for v in values]
        ax.bar(
            xs,
            heights,
            width * 0.95,
            label=name,
            color=colour,
            hatch=(hatches or {}).get(name),
            edgecolor="white" if not (hatches or {}).get(name) else "black",
            linewidth=0.5,
        )
        for x, v in zip(xs, values):
            if isinstance(v, str):
                ax.text(x, base if log else 0, v, rotation=90, ha="center", va="bottom", fontsize=7)
            elif isinstance(v, (int, float)) and v > 0 and n * len(categories) <= 12:
                ax.text(x, v, _plain_number(float(f"{v:.3g}")), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylabel(ylabel)
    if log and positive:
        _log_y(ax)
        ax.set_ylim(base, max(positive) * 12)  # headroom above the bars for the legend
    elif positive:
        ax.set_ylim(0, max(positive) * 1.45)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right", ncol=2 if n > 3 else 1)


def bar_series(
    rows: Sequence[dict[str, Any]],
    category: Callable[[dict[str, Any]], Any],
    series: Callable[[dict[str, Any]], str],
    key: str,
) -> tuple[list[Any], dict[str, list[float | str | None]]]:
    """Categories and, per series, one value per category: the row's ``key``, its failure status, or None.

    Memory values (keys ending in ``_mb``) are raised to :data:`MEMORY_FLOOR_MB` so a log axis can show them.
    """
    cats = list(dict.fromkeys(category(r) for r in rows))
    out: dict[str, list[float | str | None]] = {}
    for name in dict.fromkeys(series(r) for r in rows):
        vals: list[float | str | None] = []
        for cat in cats:
            row = next((r for r in rows if category(r) == cat and series(r) == name), None)
            if row is None:
                vals.append(None)
            elif _status(row) != OK:
                vals.append(_status(row))
            else:
                v = row.get(key)
                vals.append(max(v, MEMORY_FLOOR_MB) if v is not None and key.endswith("_mb") else v)
        out[name] = vals
    return cats, out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 10**digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs.

    Rows that failed (status other than ok) and carry an ``error`` get a line under the table with the
    error's last line, named by the row's first three columns.
    """
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    failures = []
    for r in rows:
        error = str(r.get("error") or "").strip()
        if _status(r) != OK and error:
            name = ", ".join(_fmt(r.get(k)) for k, _ in columns[:3])
            failures.append(f"- {name}: {_status(r)}: `{error.splitlines()[-1][:200].replace('`', chr(39))}`")
    if failures:
        lines += ["", "Not measured:", "", *failures]
    return "\n".join(lines)


def _status(row: dict[str, Any]) -> str:
    return str(row.get("status", OK))


def _rel(path: Path, out_dir: Path) -> str:
    return os.path.relpath(path, out_dir)


def _source_line(bf: BenchFile) -> str:
    return f"Source: `{bf.path}`; machine: {machine_label(bf)[1]}."


# ---------------------------------------------------------------------------------------------------------
# Losses


LOSS_NAMES = {"loss_clip": "CLIP", "loss_siglip": "SigLIP"}


def _loss_figures(bf: BenchFile, out_dir: Path, used: set[str]) -> tuple[list[Path], list[str]]:
    """Time+memory and TFLOP/s figures per (device, dtype, D) of one loss JSON; returns (plots, ratios)."""
    loss = LOSS_NAMES[bf.kind]
    short, foot = _plot_label(bf)
    matmul = bf.data.get("matmul_tflops")
    plots, ratios = [], []
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in bf.rows:
        groups.setdefault((row["device"], row["dtype"], row["D"]), []).append(row)
    for (device, dtype, dim), rows in groups.items():
        palette: dict[str, str] = {}
        by_provider: dict[str, dict[int, dict[str, Any]]] = {}
        for row in rows:
            by_provider.setdefault(row["provider"], {}).setdefault(row["B"], row)  # first measurement of a B
        where = f"{device}, {dtype}, D={dim}"
        fig, (ax_t, ax_m) = _figure(2, f"{loss} loss forward+backward — {short} ({where})", foot)
        batches = sorted({b for pts in by_provider.values() for b in pts})
        for ax, key, ylabel in (
            (ax_t, "median_ms", "fwd+bwd time (ms, median)"),
            (ax_m, "peak_above_baseline_mb", "peak memory above inputs (MiB)"),
        ):
            failures, values = [], []
            for provider, pts in by_provider.items():
                colour = _colour(provider, palette)
                xs, ys = [], []
                for b in sorted(pts):
                    row = pts[b]
                    if _status(row) != OK:
                        failures.append((b, _status(row), colour))
                        continue
                    xs.append(b)
                    ys.append(
                        max(float(row[key]), MEMORY_FLOOR_MB) if key.endswith("_mb") else float(row[key])
                    )
                values += ys
                backend = next((pts[b].get("backend") for b in pts if pts[b].get("backend")), None)
                label = provider + (f" ({backend})" if backend else "")
                ax.plot(xs, ys, marker="o", color=colour, label=label)
            if key.endswith("_mb"):
                inputs = [2 * b * dim * (2 if dtype in ("bf16", "fp16") else 4) / 2**20 for b in batches]
                ax.plot(batches, inputs, linestyle=":", color="black", label="inputs' own size (2·B·D)")
                values += inputs
                ax.axhline(MEMORY_FLOOR_MB, color="lightgray", linewidth=0.8)
                ax.text(
                    batches[-1],
                    MEMORY_FLOOR_MB * 1.1,
                    f"values ≤ {MEMORY_FLOOR_MB} MiB drawn here",
                    fontsize=6,
                    color="gray",
                    ha="right",
                )
            top = max(values) * 3 if values else 1.0
            _batch_x(ax, batches)
            _log_y(ax)
            _mark_failures(ax, failures, top)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
            handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=handles + ([_failure_handle()] if failures else []), fontsize=7)
        ax_t.set_title("time (lower is better)", fontsize=10)
        ax_m.set_title("peak memory (lower is better)", fontsize=10)
        plots.append(_save(fig, out_dir, f"{bf.path.stem}_{device}_{dtype}_D{dim}_time_memory", used))

        fig, (ax,) = _figure(1, f"{loss} loss achieved TFLOP/s — {short}", foot, width=7.5, height=4.6)
        ax.set_title(f"{where}; each provider counts the FLOPs it executes (flops_counted)", fontsize=9)
        for provider, pts in by_provider.items():
            ok = [(b, pts[b]["tflops"]) for b in sorted(pts) if _status(pts[b]) == OK]
            if ok:
                ax.plot(*zip(*ok), marker="o", color=_colour(provider, palette), label=provider)
        if isinstance(matmul, (int, float)) and matmul > 0:
            ax.axhline(
                matmul,
                color="black",
                linestyle="--",
                label=f"measured {dtype} matmul rate: {matmul:.3g} TFLOP/s (roofline)",
            )
        _batch_x(ax, batches)
        _log_y(ax)
        ax.set_ylabel("achieved TFLOP/s (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        plots.append(_save(fig, out_dir, f"{bf.path.stem}_{device}_{dtype}_D{dim}_tflops", used))

        fused = by_provider.get("fused", {})
        for other, pts in by_provider.items():
            if other.startswith("fused"):
                continue
            common = [b for b in sorted(fused)
                      if b in pts and _status(fused[b]) == OK and _status(pts[b]) == OK]
            for b in common:
                f, m = fused[b], pts[b]
                mem = (
                    f"{m['peak_above_baseline_mb'] / f['peak_above_baseline_mb']:.3g}×"
                    if f["peak_above_baseline_mb"] > MEMORY_FLOOR_MB
                    else f"> {m['peak_above_baseline_mb'] / MEMORY_FLOOR_MB:.3g}× "
                    f"(fused ≤ {MEMORY_FLOOR_MB} MiB)"
                )
                ratios.append(
                    f"- {where}, B={b}: {other}/fused time {m['median_ms'] / f['median_ms']:.3g}×, "
                    f"peak memory {mem} ({m['peak_above_baseline_mb']:.4g} vs "
                    f"{f['peak_above_baseline_mb']:.4g} MiB)"
                )
    return plots, ratios


def section_loss(files: list[BenchFile], kind: str, out_dir: Path, used: set[str]) -> Section:
    name = LOSS_NAMES[kind]
    flag = "" if kind == "loss_clip" else " --loss siglip"
    title = f"{name} loss: time, memory and TFLOP/s (`bench/loss_throughput.py{flag}`)"
    if not files:
        return Section(
            title,
            f"_Not found: no JSON from `bench/loss_throughput.py{flag}` in the input folders; "
            "section skipped._",
            [],
        )
    parts, plots = [], []
    for bf in files:
        _require(
            bf, ("rows", "matmul_tflops"), ok_rows_need=("median_ms", "tflops", "peak_above_baseline_mb")
        )
        for i, row in enumerate(bf.rows):
            missing = [k for k in ("provider", "B", "D", "dtype", "device") if k not in row]
            if missing:
                raise ReportInputError(f"{bf.path}: rows[{i}] lacks {missing}")
        figs, ratios = _loss_figures(bf, out_dir, used)
        plots += figs
        parts.append(_source_line(bf))
        parts += [f"![{p.stem}]({_rel(p, out_dir)})" for p in figs]
        if ratios:
            parts.append("Fused against every other provider, same B (time and memory ratios, "
                         "other/fused):\n\n" + "\n".join(ratios))
        parts.append(
            md_table(
                bf.rows,
                [
                    ("provider", "provider"),
                    ("backend", "backend"),
                    ("path", "path"),
                    ("B", "B"),
                    ("D", "D"),
                    ("dtype", "dtype"),
                    ("status", "status"),
                    ("median_ms", "fwd+bwd ms"),
                    ("flops_counted", "FLOPs counted"),
                    ("tflops", "TFLOP/s"),
                    ("peak_above_baseline_mb", "peak above inputs MiB"),
                    ("loss_err", "loss err vs fp64"),
                    ("d_image_err", "d_image err vs fp64"),
                ],
            )
        )
        if bf.data.get("cpu_target"):
            t = bf.data["cpu_target"]
            parts.append(
                f"CPU target (B={t.get('B')}, D={t.get('D')}, {t.get('dtype')}): "
                f"fused ({t.get('fused_path')}) "
                f"at {_fmt(t.get('speed_vs_plain_compiled'))}× the speed of the compiled one-GEMM loss "
                f"(target ≥ {_fmt(t.get('speed_target'))}); B={t.get('big_B')} on the recompute path: "
                f"{_fmt(t.get('big_peak_above_inputs_mb'))} MiB above the inputs' "
                f"{_fmt(t.get('inputs_mb'))} MiB (the plain loss needs "
                f"≥ {_fmt(t.get('plain_needs_at_least_mb'))} MiB)."
            )
    return Section(title, "\n\n".join(parts), plots)


# ---------------------------------------------------------------------------------------------------------
# Distributed memory


def section_distributed(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    title = "Global-batch loss: memory per rank (`bench/distributed_memory.py`)"
    if not files:
        return Section(
            title,
            "_Not found: no JSON from `bench/distributed_memory.py` in the input folders; section skipped._",
            [],
        )
    points: dict[tuple[int, str, int, int], dict[str, Any]] = {}  # (D, provider, world, B) -> worst rank
    for bf in files:
        _require(bf, ("rows", "world", "B", "D"), ok_rows_need=("peak_above_baseline_mb", "step_s"))
        for row in bf.rows:
            key = (row["D"], row["provider"], row["world"], row["B"])
            cur = points.setdefault(
                key,
                {
                    "provider": row["provider"],
                    "world": row["world"],
                    "B": row["B"],
                    "D": row["D"],
                    "status": OK,
                    "peak_mb": 0.0,
                    "step_s": 0.0,
                    "inputs_mb": row.get("inputs_mb"),
                    "file": bf,
                },
            )
            if _status(row) != OK:
                cur["status"] = _status(row)
                continue
            cur["peak_mb"] = max(cur["peak_mb"], row["peak_above_baseline_mb"])
            cur["step_s"] = max(cur["step_s"], row["step_s"])
    plots, parts = [], []
    for dim in sorted({k[0] for k in points}):
        mine = {k: v for k, v in points.items() if k[0] == dim}
        some = next(iter(mine.values()))["file"]
        short, foot = _plot_label(some)
        palette: dict[str, str] = {}
        worlds = sorted({k[2] for k in mine})
        styles = dict(zip(worlds, ["-", "--", "-.", ":"] * 4))
        fig, (ax,) = _figure(
            1, f"Global-batch loss, per-rank peak memory — {short}", foot, width=9.5, height=4.8
        )
        ax.set_title(f"gloo, D={dim}; worst rank's peak above its inputs", fontsize=9)
        values, failures = [], []
        for provider in dict.fromkeys(k[1] for k in mine):
            colour = _colour(provider, palette)
            for world in worlds:
                pts = sorted((k[3], v) for k, v in mine.items() if k[1] == provider and k[2] == world)
                ok = [(b, max(v["peak_mb"], MEMORY_FLOOR_MB)) for b, v in pts if v["status"] == OK]
                failures += [(b, v["status"], colour) for b, v in pts if v["status"] != OK]
                if ok:
                    ax.plot(
                        *zip(*ok),
                        marker="o",
                        color=colour,
                        linestyle=styles[world],
                        label=f"{provider}, {world} ranks",
                    )
                    values += [y for _, y in ok]
        inputs = sorted({(k[3], k[2]): v["inputs_mb"] for k, v in mine.items() if v.get("inputs_mb")}.items())
        for world in worlds:
            pts = [(b, mb) for (b, w), mb in inputs if w == world]
            if pts:
                ax.plot(
                    *zip(*pts),
                    color="black",
                    linestyle=styles[world],
                    linewidth=0.8,
                    alpha=0.6,
                    label=f"inputs per rank, {world} ranks",
                )
        _batch_x(ax, sorted({k[3] for k in mine}), "global batch B (log scale)")
        _log_y(ax)
        _mark_failures(ax, failures, max(values) * 3 if values else 1.0)
        ax.set_ylabel("per-rank peak memory above inputs (MiB)")
        ax.grid(alpha=0.3, which="both")
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(
            handles=handles + ([_failure_handle()] if failures else []),
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
        )
        plots.append(_save(fig, out_dir, f"distributed_memory_D{dim}", used))
        parts.append(f"![distributed memory D={dim}]({_rel(plots[-1], out_dir)})")
    summary: list[dict[str, Any]] = []
    for bf in files:
        for loss, s in (bf.data.get("summary") or {}).items():
            summary.append(
                {"loss": loss, "B": bf.data["B"], "D": bf.data["D"], "world": bf.data["world"], **s}
            )
    by_machine: dict[str, list[str]] = {}
    for bf in files:
        by_machine.setdefault(_without_commit(machine_label(bf)[1]), []).append(f"`{bf.path}`")
    parts += [f"Sources: {', '.join(paths)}; machine: {m}." for m, paths in by_machine.items()]
    if summary:
        summary.sort(key=lambda r: (r["loss"], r["D"], r["B"], r["world"]))
        parts.append(
            "Worst rank, global-batch loss against OpenCLIP-style gathering:\n\n"
            + md_table(
                summary,
                [
                    ("loss", "loss"),
                    ("B", "global B"),
                    ("D", "D"),
                    ("world", "ranks"),
                    ("global_peak_mb", "global MiB"),
                    ("openclip_peak_mb", "OpenCLIP-style MiB"),
                    ("ratio", "ratio"),
                    ("target", "target ≤"),
                ],
            )
        )
    table = sorted(points.values(), key=lambda r: (r["D"], r["B"], r["world"], r["provider"]))
    parts.append(
        md_table(
            table,
            [
                ("provider", "provider"),
                ("world", "ranks"),
                ("B", "global B"),
                ("D", "D"),
                ("status", "status"),
                ("peak_mb", "worst-rank peak MiB"),
                ("inputs_mb", "inputs/rank MiB"),
                ("step_s", "step s"),
            ],
        )
    )
    return Section(title, "\n\n".join(parts), plots)


# ---------------------------------------------------------------------------------------------------------
# Adapter, embedding, training steps


def section_adapter(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    title = "Text adapter: lean vs eager vs compiled (`bench/adapter_throughput.py`)"
    if not files:
        return Section(
            title,
            "_Not found: no JSON from `bench/adapter_throughput.py` in the input folders; section skipped._",
            [],
        )
    plots, parts = [], []
    for bf in files:
        _require(bf, ("rows", "device", "dtype"), ok_rows_need=("fwd_ms", "fwdbwd_ms"))
        short, foot = _plot_label(bf)
        palette: dict[str, str] = {}

        def config(r: dict[str, Any]) -> str:
            return f"B={r['batch']}\n{r['dim']}→{r.get('out')}"

        # "lean" runs the Triton kernels on CUDA and _C's row kernels on the CPU: the legend says which.
        lean_backend = next(
            (r["backend"] for r in bf.rows if r["impl"] == "lean" and r.get("backend")), None
        )

        def impl(r: dict[str, Any], lean_backend: str | None = lean_backend) -> str:
            return f"lean ({lean_backend})" if r["impl"] == "lean" and lean_backend else r["impl"]

        where = f"{bf.data['device']}, {bf.data['dtype']}, {bf.data.get('num_blocks', '?')} blocks"
        fig, (ax_t, ax_m) = _figure(2, f"Text adapter forward+backward — {short} ({where})", foot)
        cats, times = bar_series(bf.rows, config, impl, "fwdbwd_ms")
        _grouped_bars(ax_t, cats, times, "fwd+bwd time (ms, median, log)", palette, log=True)
        ax_t.set_title("time (lower is better)", fontsize=10)
        _grouped_bars(
            ax_m,
            cats,
            bar_series(bf.rows, config, impl, "act_peak_mb")[1],
            "activation peak memory (MiB, log)",
            palette,
            log=True,
        )
        ax_m.set_title("memory of one training step (lower is better)", fontsize=10)
        for ax in (ax_t, ax_m):
            ax.set_xlabel("batch and adapter shape (d_in→d_out)")
        plots.append(_save(fig, out_dir, f"{bf.path.stem}_{bf.data['device']}_{bf.data['dtype']}", used))
        parts += [_source_line(bf), f"![adapter]({_rel(plots[-1], out_dir)})"]
        parts.append(
            md_table(
                bf.rows,
                [
                    ("impl", "impl"),
                    ("backend", "backend"),
                    ("batch", "B"),
                    ("dim", "d"),
                    ("out", "out"),
                    ("status", "status"),
                    ("fwd_ms", "fwd ms"),
                    ("fwdbwd_ms", "fwd+bwd ms"),
                    ("fwdbwd_tflops", "TFLOP/s"),
                    ("pct_matmul", "% matmul"),
                    ("speedup_vs_eager", "× eager"),
                    ("act_peak_mb", "act. peak MiB"),
                    ("saved_mb", "saved MiB"),
                    ("saved_vs_eager", "saved / eager"),
                    ("grad_err", "grad rel. err"),
                    ("err_vs_eager", "err / eager's"),
                ],
            )
        )
    return Section(title, "\n\n".join(parts), plots)


def _embed_model(row: dict[str, Any]) -> str:
    return str(row["model"]).replace(" (", "\n(")


def _embed_mode(row: dict[str, Any]) -> str:
    return str(row["mode"])


def section_embed(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    title = "Caption embedding: precision and 8-bit modes (`bench/embed_throughput.py`)"
    if not files:
        return Section(
            title,
            "_Not found: no JSON from `bench/embed_throughput.py` in the input folders; section skipped._",
            [],
        )
    plots, parts = [], []
    for bf in files:
        _require(bf, ("rows",), ok_rows_need=("captions_per_s", "weights_mb", "centred_mean"))
        short, foot = _plot_label(bf)
        device = (bf.data.get("args") or {}).get("device", "?")
        palette: dict[str, str] = {}
        fig, (ax_c, ax_w, ax_f) = _figure(
            3, f"Caption embedding — {short} ({device})", foot, width=4.6, height=4.4
        )
        cats, speed = bar_series(bf.rows, _embed_model, _embed_mode, "captions_per_s")
        _grouped_bars(ax_c, cats, speed, "captions/s (log)", palette, log=True)
        ax_c.set_title("throughput (higher is better)", fontsize=10)
        _grouped_bars(
            ax_w,
            cats,
            bar_series(bf.rows, _embed_model, _embed_mode, "weights_mb")[1],
            "weight memory (MiB, log)",
            palette,
            log=True,
        )
        ax_w.set_title("weights per mode", fontsize=10)
        _grouped_bars(
            ax_f,
            cats,
            bar_series(bf.rows, _embed_model, _embed_mode, "centred_mean")[1],
            "centred cosine to fp32 (mean)",
            palette,
        )
        ax_f.set_title("fidelity (target >= 0.99)", fontsize=10)
        plots.append(_save(fig, out_dir, f"{bf.path.stem}_{device}", used))
        parts += [_source_line(bf), f"![embed]({_rel(plots[-1], out_dir)})"]
        if bf.data.get("partial"):
            parts.append("**Partial run**: the sweep was interrupted; only the points below were measured.")
        parts.append(
            md_table(
                bf.rows,
                [
                    ("model", "model"),
                    ("mode", "mode"),
                    ("status", "status"),
                    ("linear_backend", "linear"),
                    ("captions_per_s", "captions/s"),
                    ("speed_vs_bf16", "× bf16"),
                    ("weights_mb", "weights MiB"),
                    ("weights_vs_bf16", "weights / bf16"),
                    ("raw_mean", "raw cos mean"),
                    ("centred_mean", "centred cos mean"),
                    ("centred_min", "centred cos min"),
                    ("kept_16bit", "16-bit layers"),
                    ("pad_frac", "pad share"),
                ],
            )
        )
    return Section(title, "\n\n".join(parts), plots)


def _step_section(
    files: list[BenchFile],
    out_dir: Path,
    used: set[str],
    *,
    title: str,
    script: str,
    group: Callable[[dict[str, Any]], str],
    series_key: str,
    rate_key: str,
    rate_label: str,
    columns: list[tuple[str, str]],
) -> Section:
    if not files:
        return Section(
            title, f"_Not found: no JSON from `bench/{script}` in the input folders; section skipped._", []
        )
    plots, parts = [], []
    for bf in files:
        _require(bf, ("rows", "device"), ok_rows_need=(rate_key, "step_ms"))
        short, foot = _plot_label(bf)
        palette: dict[str, str] = {}

        def name(r: dict[str, Any]) -> str:
            return str(r[series_key])

        cats, rates = bar_series(bf.rows, group, name, rate_key)
        memory = bar_series(bf.rows, group, name, "step_peak_mb")[1]
        fig, (ax_r, ax_m) = _figure(2, f"{title.split(' (')[0]} — {short} ({bf.data['device']})", foot)
        _grouped_bars(ax_r, cats, rates, rate_label, palette)
        ax_r.set_title("throughput (higher is better)", fontsize=10)
        _grouped_bars(ax_m, cats, memory, "step peak memory above weights+state (MiB)", palette)
        ax_m.set_title("memory of one step (lower is better)", fontsize=10)
        plots.append(_save(fig, out_dir, f"{bf.path.stem}_{bf.data['device']}", used))
        parts += [
            _source_line(bf),
            f"![step]({_rel(plots[-1], out_dir)})",
            md_table(bf.rows, columns),
        ]
    return Section(title, "\n\n".join(parts), plots)


def section_train1(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    return _step_section(
        files,
        out_dir,
        used,
        title="Stage-1 training step (`bench/train_throughput.py --stage 1`)",
        script="train_throughput.py --stage 1",
        group=lambda r: f"{r.get('base')} base\n{r.get('model')}, B={r.get('batch')}",
        series_key="loss",
        rate_key="captions_per_s",
        rate_label="captions/s",
        columns=[
            ("loss", "loss"),
            ("base", "frozen base"),
            ("model", "model"),
            ("batch", "B"),
            ("status", "status"),
            ("step_ms", "step ms"),
            ("captions_per_s", "captions/s"),
            ("base_mb", "base MiB"),
            ("step_peak_mb", "step peak MiB"),
            ("logits_mb", "B×B logits MiB"),
        ],
    )


def section_stage2(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    return _step_section(
        files,
        out_dir,
        used,
        title="Stage-2 training step (`bench/stage2_throughput.py`)",
        script="stage2_throughput.py",
        group=lambda r: f"{r.get('tower')}\nB={r.get('batch')}",
        series_key="impl",
        rate_key="images_per_s",
        rate_label="images/s",
        columns=[
            ("impl", "impl"),
            ("tower", "tower"),
            ("batch", "B"),
            ("micro", "micro"),
            ("loss_backend", "loss"),
            ("status", "status"),
            ("step_ms", "step ms"),
            ("images_per_s", "images/s"),
            ("speedup_vs_plain", "× plain"),
            ("step_peak_mb", "step peak MiB"),
            ("mem_vs_plain", "mem / plain"),
            ("logits_mb", "B×B logits MiB"),
        ],
    )


# ---------------------------------------------------------------------------------------------------------
# Other benches and gpu_check


def section_other(files: list[BenchFile], out_dir: Path) -> Section | None:
    """Bench JSON no reader above knows (e.g. a cache bench): its scalar keys and a table of its rows."""
    if not files:
        return None
    parts = []
    for bf in files:
        name = bf.data.get("bench") or bf.path.stem
        scalars = {
            k: v for k, v in bf.data.items() if isinstance(v, (str, int, float, bool)) and k != "bench"
        }
        parts.append(
            f"### {name}\n\n{_source_line(bf)}"
            + ("\n\n" + ", ".join(f"{k}: {_fmt(v)}" for k, v in scalars.items()) if scalars else "")
        )
        rows = [r for r in bf.rows if isinstance(r, dict)] if isinstance(bf.data.get("rows"), list) else []
        if rows:
            keys = [
                k
                for k in dict.fromkeys(k for r in rows for k in r)
                if all(isinstance(r.get(k), (str, int, float, bool, type(None))) for r in rows)
                and k not in ("error",)
            ][:12]
            parts.append(md_table(rows, [(k, k) for k in keys]))
    return Section("Other bench results", "\n\n".join(parts), [])


def _demote_headings(markdown: str, levels: int = 2) -> str:
    """``markdown`` with every ATX heading outside code fences ``levels`` deeper (# -> ###)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def read_gpu_check(folders: Sequence[Path], files: Sequence[BenchFile]) -> Section:
    """gpu_check's summary.md verbatim and one line per stage JSON; assumes no schema beyond a JSON object.

    Kept apart from the other readers: gpu_check's format is its own (``llm2clip_fast.gpu_check/1``),
    so only keys that are commonly present (``stage``/``name``, ``status``/``ok``/``passed``,
    ``elapsed_s``/``wall_s``, a ``results`` list with per-result ``status``, ``title``) are looked for,
    each optional, and whatever else a stage holds is left to summary.md and its own file.
    """
    title = "GPU check (`bench/gpu_check.py`)"
    if not folders and not files:
        return Section(
            title,
            "_Not found: no `bench/gpu_check.py` output (a folder with `summary.md` or a "
            "`gpu_check*.json`) in the input folders; section skipped. H200 numbers are "
            "measured by it._",
            [],
        )
    parts = []
    for folder in folders:
        summary = folder / "summary.md"
        parts.append(
            f"From `{folder}` (`summary.md` verbatim, its headings two levels down to sit in this section):"
            f"\n\n{_demote_headings(summary.read_text().rstrip())}"
        )
    lines = []
    for bf in files:
        d = bf.data
        stage = d.get("stage") or d.get("name") or bf.path.stem
        status = next((d[k] for k in ("status", "ok", "passed", "result") if k in d), None)
        elapsed = next((d[k] for k in ("elapsed_s", "wall_s", "seconds", "duration_s") if k in d), None)
        extra = f", {_fmt(elapsed)} s" if isinstance(elapsed, (int, float)) else ""
        results = d.get("results")
        if isinstance(results, list) and results:
            states = [r.get("status") if isinstance(r, dict) else None for r in results]
            extra += (
                f", results: {states.count(OK)} ok, {states.count('skipped')} skipped, {len(states)} in all"
            )
        if isinstance(d.get("title"), str):
            extra += f" ({d['title']})"
        lines.append(f"- `{bf.path.name}`: stage {_fmt(stage)}, status {_fmt(status)}{extra}")
    if lines:
        parts.append("Stage files:\n\n" + "\n".join(lines))
    return Section(title, "\n\n".join(parts), [])


# ---------------------------------------------------------------------------------------------------------
# Report


def build_report(
    folders: Sequence[Path], out_dir: Path, *, notes: Sequence[str] = (), plot_note: str = ""
) -> Path:
    """Read the bench JSON under ``folders`` and write ``out_dir/report.md`` plus its PNG plots.

    ``notes`` are quoted at the top of report.md; ``plot_note`` (e.g. "measured under load") is
    also written on every plot.
    """
    files, gpu_dirs = load_inputs(folders)
    for f in files:
        f.note = plot_note
    notes = ([plot_note] if plot_note else []) + list(notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()

    def of(kind: str) -> list[BenchFile]:
        return [f for f in files if f.kind == kind]

    def build(kind: str, make: Callable[[list[BenchFile]], Section]) -> Section:
        """One section; content its reader cannot use is an error naming the files, not a traceback."""
        mine = of(kind)
        try:
            return make(mine)
        except ReportInputError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            names = ", ".join(str(f.path) for f in mine)
            raise ReportInputError(
                f"{names}: unexpected content for {kind} ({type(exc).__name__}: {exc})"
            ) from exc

    sections = [
        build("loss_clip", lambda fs: section_loss(fs, "loss_clip", out_dir, used)),
        build("loss_siglip", lambda fs: section_loss(fs, "loss_siglip", out_dir, used)),
        build("distributed", lambda fs: section_distributed(fs, out_dir, used)),
        build("adapter", lambda fs: section_adapter(fs, out_dir, used)),
        build("embed", lambda fs: section_embed(fs, out_dir, used)),
        build("train1", lambda fs: section_train1(fs, out_dir, used)),
        build("stage2", lambda fs: section_stage2(fs, out_dir, used)),
    ]
    other = section_other(of("other"), out_dir)
    if other is not None:
        sections.append(other)
    sections.append(read_gpu_check(gpu_dirs, of("gpu_check")))

    # One line per machine: a sweep run across several commits is still one machine.
    machines = sorted({_without_commit(machine_label(f)[1]) for f in files if f.kind != "gpu_check"})
    lines = [
        "# llm2clip_fast benchmark report",
        "",
        f"Built {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `bench/report.py` from "
        + ", ".join(f"`{f}`" for f in folders)
        + f" ({len(files)} JSON files).",
        "",
    ]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    if machines:
        lines += ["Machines:", ""] + [f"- {m}" for m in machines] + [""]
    lines += [
        "Contents: " + ", ".join(f"[{s.title.split(' (')[0]}](#{_anchor(s.title)})" for s in sections),
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", "", s.body, ""]
    path = out_dir / "report.md"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report.md.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


# The --quick run: (script, extra args, output name; None means the script takes a folder as --out).
QUICK_RUNS: list[tuple[str, list[str], str | None]] = [
    ("loss_throughput.py", [], "loss_throughput.json"),
    ("loss_throughput.py", ["--loss", "siglip"], "loss_throughput_siglip.json"),
    ("distributed_memory.py", [], "distributed_memory.json"),
    ("adapter_throughput.py", [], "adapter_throughput.json"),
    ("embed_throughput.py", [], "embed_throughput.json"),
    ("train_throughput.py", ["--stage", "1"], "train_throughput_stage1.json"),
    ("stage2_throughput.py", [], "stage2_throughput.json"),
    ("cache_throughput.py", [], "cache_throughput.json"),
    ("gpu_check.py", [], None),
]


def run_quick_benches(results: Path, timeout_s: float, only: Sequence[str] | None = None) -> list[str]:
    """Run each bench script that exists with ``--quick`` into ``results``; return one note per problem."""
    results.mkdir(parents=True, exist_ok=True)
    notes = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR.parent), env.get("PYTHONPATH")]))
    for script, extra, out_name in QUICK_RUNS:
        tag = script + (" " + " ".join(extra) if extra else "")
        if only and script.removesuffix(".py") not in only:
            continue
        if not (BENCH_DIR / script).exists():
            notes.append(f"bench/{script} does not exist here; not run.")
            continue
        out = results / (out_name or script.removesuffix(".py"))
        cmd = [sys.executable, str(BENCH_DIR / script), *extra, "--quick", "--out", str(out)]
        log = results / f"{out.stem}.log"
        t0 = time.perf_counter()
        print(f"running {tag} --quick ...", flush=True)
        try:
            with open(log, "w") as f:
                rc = subprocess.run(
                    cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
                ).returncode
        except subprocess.TimeoutExpired:
            notes.append(f"bench/{tag} --quick timed out after {timeout_s:g} s (log: `{log}`).")
            continue
        print(f"  rc={rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            notes.append(f"bench/{tag} --quick exited with {rc} (log: `{log}`).")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--in",
        dest="inputs",
        type=Path,
        nargs="+",
        default=None,
        help="folders holding bench JSON (default: bench/results, or OUT/results with --quick)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and the PNG plots")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="first run every bench script with --quick into OUT/results (CI smoke run)",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="with --quick: run only these scripts (names without .py)"
    )
    parser.add_argument("--note", default="", help='said on every plot and atop report.md, e.g. "under load"')
    parser.add_argument("--bench-timeout-s", type=float, default=900, help="with --quick: per script")
    args = parser.parse_args(argv)

    known = {script.removesuffix(".py") for script, _, _ in QUICK_RUNS}
    if args.only and set(args.only) - known:
        parser.error(f"--only: unknown {sorted(set(args.only) - known)}; choose from {sorted(known)}")
    notes: list[str] = []
    folders = list(args.inputs or [])
    if args.quick:
        results = args.out / "results"
        notes = run_quick_benches(results, args.bench_timeout_s, args.only)
        folders.append(results)
    elif not folders:
        folders = [BENCH_DIR / "results"]
    try:
        path = build_report(folders, args.out, notes=notes, plot_note=args.note)
    except ReportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    return 1 if notes and any("exited" in n or "timed out" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
