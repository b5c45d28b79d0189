"""Section: caption embedding, captions/s, weight memory and fidelity per precision and 8-bit mode
(``bench/embed_throughput.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report_sections.inputs import BenchFile, Section, plot_label, require
from bench.report_sections.plots import bar_series, figure, grouped_bars, save
from bench.report_sections.tables import md_table, not_found, rel, source_line

TITLE = "Caption embedding: precision and 8-bit modes (`bench/embed_throughput.py`)"
COLUMNS = [
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
]
# (row key, y label, log axis, axis title), one axis each.
PANELS = [
    ("captions_per_s", "captions/s (log)", True, "throughput (higher is better)"),
    ("weights_mb", "weight memory (MiB, log)", True, "weights per mode"),
    ("centred_mean", "centred cosine to fp32 (mean)", False, "fidelity (target >= 0.99)"),
]


def _embed_model(row: dict[str, Any]) -> str:
    return str(row["model"]).replace(" (", "\n(")


def _embed_mode(row: dict[str, Any]) -> str:
    return str(row["mode"])


def embed_figure(bf: BenchFile, device: str, out_dir: Path, used: set[str]) -> Path:
    short, foot = plot_label(bf)
    palette: dict[str, str] = {}
    fig, axes = figure(3, f"Caption embedding — {short} ({device})", foot, width=4.6, height=4.4)
    for ax, (key, ylabel, log, title) in zip(axes, PANELS):
        cats, values = bar_series(bf.rows, _embed_model, _embed_mode, key)
        grouped_bars(ax, cats, values, ylabel, palette, log=log)
        ax.set_title(title, fontsize=10)
    return save(fig, out_dir, f"{bf.path.stem}_{device}", used)


def section_embed(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    if not files:
        return not_found(TITLE, "embed_throughput.py")
    plots, parts = [], []
    for bf in files:
        require(bf, ("rows",), ok_rows_need=("captions_per_s", "weights_mb", "centred_mean"))
        device = (bf.data.get("args") or {}).get("device", "?")
        plots.append(embed_figure(bf, device, out_dir, used))
        parts += [source_line(bf), f"![embed]({rel(plots[-1], out_dir)})"]
        if bf.data.get("partial"):
            parts.append("**Partial run**: the sweep was interrupted; only the points below were measured.")
        parts.append(md_table(bf.rows, COLUMNS))
    return Section(TITLE, "\n\n".join(parts), plots)
