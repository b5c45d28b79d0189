"""Matplotlib figures every section uses: colours, log axes at the measured batch sizes, failure marks,
grouped bars, and saving a PNG atomically with the machine line at its foot."""

from __future__ import annotations

import os
import re
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

from bench.report_sections.inputs import OK, status

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAILED_MARK = "X"
FOOT_FONTSIZE = 7
MEMORY_FLOOR_MB = 0.1  # peak-RSS growth below this is not measurable (page granularity, allocator reuse)
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


def colour(name: str, palette: dict[str, str]) -> str:
    """The fixed colour of ``name``, else the next fallback colour (remembered in ``palette``)."""
    if name in COLOURS:
        return COLOURS[name]
    if name not in palette:
        palette[name] = _FALLBACK_COLOURS[len(palette) % len(_FALLBACK_COLOURS)]
    return palette[name]


def figure(ncols: int, title: str, foot: str, width: float = 5.2, height: float = 4.2):
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


def save(fig, out_dir: Path, name: str, used: set[str]) -> Path:
    """Write ``fig`` as ``out_dir/<name>.png`` (a name not in ``used``, then added to it), atomically."""
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


def plain_number(v: float) -> str:
    """A tick label without powers of ten: 0.05, 3, 250, 16k, 1.2M."""
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


class _PlainLogFormatter(LogFormatter):
    """Matplotlib's choice of which log ticks to label, written as plain numbers."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return plain_number(x) if super().__call__(x, pos) else ""


def log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def batch_x(ax, batches: Sequence[int], label: str = "batch size B (log scale)") -> None:
    """Log-2 x axis labelled exactly at the measured batch sizes."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(batches))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(v):,}"))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) > 5:
        ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(label)


def mark_failures(ax, failures: Sequence[tuple[float, str, str]], top: float) -> None:
    """Failed points (x, status, colour) as crosses on a line above the measured values.

    Call after the axis scales are set: it raises the (log) y limit to leave room for the labels.
    """
    for x, state, col in failures:
        ax.plot([x], [top], marker=FAILED_MARK, markersize=10, color=col, linestyle="none")
        ax.annotate(
            state, (x, top), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7, color=col
        )
    if failures:
        ax.set_ylim(top=top * 4)


def failure_handle() -> Line2D:
    """The legend entry of the failure crosses."""
    return Line2D(
        [],
        [],
        marker=FAILED_MARK,
        color="black",
        linestyle="none",
        markersize=8,
        label="not measured (OOM / error / timeout)",
    )


def legend_with_failures(ax, failures: Sequence[Any], **kwargs: Any) -> None:
    """The axis legend, plus the failure cross's entry when there are failures."""
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + ([failure_handle()] if failures else []), **kwargs)


def grouped_bars(
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
        _bars(ax, xs, name, values, width, palette, hatches, colours)
        _bar_labels(ax, xs, values, base if log else 0, n * len(categories) <= 12)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=8)
    ax.set_ylabel(ylabel)
    if log and positive:
        log_y(ax)
        ax.set_ylim(base, max(positive) * 12)  # headroom above the bars for the legend
    elif positive:
        ax.set_ylim(0, max(positive) * 1.45)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right", ncol=2 if n > 3 else 1)


def _bars(ax, xs: list[float], name: str, values: list[float | str | None], width: float,
          palette: dict[str, str], hatches: dict[str, str] | None, colours: dict[str, str] | None) -> None:
    col = (colours or {}).get(name) or colour(name.split(" ")[0], palette)
    heights = [v if isinstance(v, (int, float)) and v > 0 else 0 for v in values]
    ax.bar(
        xs,
        heights,
        width * 0.95,
        label=name,
        color=col,
        hatch=(hatches or {}).get(name),
        edgecolor="white" if not (hatches or {}).get(name) else "black",
        linewidth=0.5,
    )


def _bar_labels(ax, xs: list[float], values: list[float | str | None], base: float, numbers: bool) -> None:
    """A failure status written up from ``base``; the value above each bar when ``numbers``."""
    for x, v in zip(xs, values):
        if isinstance(v, str):
            ax.text(x, base, v, rotation=90, ha="center", va="bottom", fontsize=7)
        elif isinstance(v, (int, float)) and v > 0 and numbers:
            ax.text(x, v, plain_number(float(f"{v:.3g}")), ha="center", va="bottom", fontsize=6)


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
            elif status(row) != OK:
                vals.append(status(row))
            else:
                v = row.get(key)
                vals.append(max(v, MEMORY_FLOOR_MB) if v is not None and key.endswith("_mb") else v)
        out[name] = vals
    return cats, out
