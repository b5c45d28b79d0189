"""Section: CLIP and SigLIP loss time, memory and TFLOP/s against B (``bench/loss_throughput.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report_sections.inputs import OK, BenchFile, ReportInputError, Section, plot_label, require, status
from bench.report_sections.plots import (
    MEMORY_FLOOR_MB,
    batch_x,
    colour,
    figure,
    legend_with_failures,
    log_y,
    mark_failures,
    save,
)
from bench.report_sections.tables import fmt, md_table, not_found, rel, source_line

LOSS_NAMES = {"loss_clip": "CLIP", "loss_siglip": "SigLIP"}
COLUMNS = [
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
]
Points = dict[str, dict[int, dict[str, Any]]]  # provider -> B -> row


def _groups(bf: BenchFile) -> dict[tuple[str, str, int], Points]:
    """The rows per (device, dtype, D), then per provider and B (the first measurement of a B)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in bf.rows:
        groups.setdefault((row["device"], row["dtype"], row["D"]), []).append(row)
    out: dict[tuple[str, str, int], Points] = {}
    for key, rows in groups.items():
        by_provider: Points = {}
        for row in rows:
            by_provider.setdefault(row["provider"], {}).setdefault(row["B"], row)
        out[key] = by_provider
    return out


def _provider_lines(ax, by_provider: Points, key: str, palette: dict[str, str]) -> tuple[list, list]:
    """One line per provider of ``key`` against B; returns (failed points, plotted values)."""
    failures, values = [], []
    for provider, pts in by_provider.items():
        col = colour(provider, palette)
        xs, ys = [], []
        for b in sorted(pts):
            row = pts[b]
            if status(row) != OK:
                failures.append((b, status(row), col))
                continue
            xs.append(b)
            ys.append(max(float(row[key]), MEMORY_FLOOR_MB) if key.endswith("_mb") else float(row[key]))
        values += ys
        backend = next((pts[b].get("backend") for b in pts if pts[b].get("backend")), None)
        ax.plot(xs, ys, marker="o", color=col, label=provider + (f" ({backend})" if backend else ""))
    return failures, values


def _inputs_line(ax, batches: list[int], dim: int, dtype: str) -> list[float]:
    """The inputs' own size (2·B·D) as a dotted line, and the floor below which values are drawn."""
    inputs = [2 * b * dim * (2 if dtype in ("bf16", "fp16") else 4) / 2**20 for b in batches]
    ax.plot(batches, inputs, linestyle=":", color="black", label="inputs' own size (2·B·D)")
    ax.axhline(MEMORY_FLOOR_MB, color="lightgray", linewidth=0.8)
    ax.text(batches[-1], MEMORY_FLOOR_MB * 1.1, f"values ≤ {MEMORY_FLOOR_MB} MiB drawn here", fontsize=6,
            color="gray", ha="right")
    return inputs


def _time_memory_figure(bf: BenchFile, group: tuple[str, str, int], by_provider: Points,
                        palette: dict[str, str], out_dir: Path, used: set[str]) -> Path:
    device, dtype, dim = group
    short, foot = plot_label(bf)
    where = f"{device}, {dtype}, D={dim}"
    fig, (ax_t, ax_m) = figure(2, f"{LOSS_NAMES[bf.kind]} loss forward+backward — {short} ({where})", foot)
    batches = sorted({b for pts in by_provider.values() for b in pts})
    for ax, key, ylabel in (
        (ax_t, "median_ms", "fwd+bwd time (ms, median)"),
        (ax_m, "peak_above_baseline_mb", "peak memory above inputs (MiB)"),
    ):
        failures, values = _provider_lines(ax, by_provider, key, palette)
        if key.endswith("_mb"):
            values += _inputs_line(ax, batches, dim, dtype)
        top = max(values) * 3 if values else 1.0
        batch_x(ax, batches)
        log_y(ax)
        mark_failures(ax, failures, top)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        legend_with_failures(ax, failures, fontsize=7)
    ax_t.set_title("time (lower is better)", fontsize=10)
    ax_m.set_title("peak memory (lower is better)", fontsize=10)
    return save(fig, out_dir, f"{bf.path.stem}_{device}_{dtype}_D{dim}_time_memory", used)


def _tflops_figure(bf: BenchFile, group: tuple[str, str, int], by_provider: Points,
                   palette: dict[str, str], out_dir: Path, used: set[str]) -> Path:
    device, dtype, dim = group
    short, foot = plot_label(bf)
    matmul = bf.data.get("matmul_tflops")
    title = f"{LOSS_NAMES[bf.kind]} loss achieved TFLOP/s — {short}"
    fig, (ax,) = figure(1, title, foot, width=7.5, height=4.6)
    ax.set_title(f"{device}, {dtype}, D={dim}; each provider counts the FLOPs it executes (flops_counted)",
                 fontsize=9)
    for provider, pts in by_provider.items():
        ok = [(b, pts[b]["tflops"]) for b in sorted(pts) if status(pts[b]) == OK]
        if ok:
            ax.plot(*zip(*ok), marker="o", color=colour(provider, palette), label=provider)
    if isinstance(matmul, (int, float)) and matmul > 0:
        ax.axhline(matmul, color="black", linestyle="--",
                   label=f"measured {dtype} matmul rate: {matmul:.3g} TFLOP/s (roofline)")
    batch_x(ax, sorted({b for pts in by_provider.values() for b in pts}))
    log_y(ax)
    ax.set_ylabel("achieved TFLOP/s (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save(fig, out_dir, f"{bf.path.stem}_{device}_{dtype}_D{dim}_tflops", used)


def _ratios(where: str, by_provider: Points) -> list[str]:
    """Every other provider against fused at each B both measured: time and memory, other/fused."""
    fused = by_provider.get("fused", {})
    ratios = []
    for other, pts in by_provider.items():
        if other.startswith("fused"):
            continue
        for b in [b for b in sorted(fused) if b in pts and status(fused[b]) == OK and status(pts[b]) == OK]:
            f, m = fused[b], pts[b]
            mem = (
                f"{m['peak_above_baseline_mb'] / f['peak_above_baseline_mb']:.3g}×"
                if f["peak_above_baseline_mb"] > MEMORY_FLOOR_MB
                else f"> {m['peak_above_baseline_mb'] / MEMORY_FLOOR_MB:.3g}× (fused ≤ {MEMORY_FLOOR_MB} MiB)"
            )
            ratios.append(
                f"- {where}, B={b}: {other}/fused time {m['median_ms'] / f['median_ms']:.3g}×, "
                f"peak memory {mem} ({m['peak_above_baseline_mb']:.4g} vs "
                f"{f['peak_above_baseline_mb']:.4g} MiB)"
            )
    return ratios


def loss_figures(bf: BenchFile, out_dir: Path, used: set[str]) -> tuple[list[Path], list[str]]:
    """Time+memory and TFLOP/s figures per (device, dtype, D) of one loss JSON; returns (plots, ratios)."""
    plots, ratios = [], []
    for group, by_provider in _groups(bf).items():
        palette: dict[str, str] = {}
        plots.append(_time_memory_figure(bf, group, by_provider, palette, out_dir, used))
        plots.append(_tflops_figure(bf, group, by_provider, palette, out_dir, used))
        device, dtype, dim = group
        ratios += _ratios(f"{device}, {dtype}, D={dim}", by_provider)
    return plots, ratios


def _cpu_target(t: dict[str, Any]) -> str:
    return (
        f"CPU target (B={t.get('B')}, D={t.get('D')}, {t.get('dtype')}): "
        f"fused ({t.get('fused_path')}) "
        f"at {fmt(t.get('speed_vs_plain_compiled'))}× the speed of the compiled one-GEMM loss "
        f"(target ≥ {fmt(t.get('speed_target'))}); B={t.get('big_B')} on the recompute path: "
        f"{fmt(t.get('big_peak_above_inputs_mb'))} MiB above the inputs' "
        f"{fmt(t.get('inputs_mb'))} MiB (the plain loss needs "
        f"≥ {fmt(t.get('plain_needs_at_least_mb'))} MiB)."
    )


def _check(bf: BenchFile) -> None:
    require(bf, ("rows", "matmul_tflops"), ok_rows_need=("median_ms", "tflops", "peak_above_baseline_mb"))
    for i, row in enumerate(bf.rows):
        missing = [k for k in ("provider", "B", "D", "dtype", "device") if k not in row]
        if missing:
            raise ReportInputError(f"{bf.path}: rows[{i}] lacks {missing}")


def section_loss(files: list[BenchFile], kind: str, out_dir: Path, used: set[str]) -> Section:
    flag = "" if kind == "loss_clip" else " --loss siglip"
    title = f"{LOSS_NAMES[kind]} loss: time, memory and TFLOP/s (`bench/loss_throughput.py{flag}`)"
    if not files:
        return not_found(title, f"loss_throughput.py{flag}")
    parts, plots = [], []
    for bf in files:
        _check(bf)
        figs, ratios = loss_figures(bf, out_dir, used)
        plots += figs
        parts.append(source_line(bf))
        parts += [f"![{p.stem}]({rel(p, out_dir)})" for p in figs]
        if ratios:
            parts.append("Fused against every other provider, same B (time and memory ratios, "
                         "other/fused):\n\n" + "\n".join(ratios))
        parts.append(md_table(bf.rows, COLUMNS))
        if bf.data.get("cpu_target"):
            parts.append(_cpu_target(bf.data["cpu_target"]))
    return Section(title, "\n\n".join(parts), plots)
