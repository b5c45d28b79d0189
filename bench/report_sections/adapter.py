"""Section: the text adapter, lean vs eager vs compiled (``bench/adapter_throughput.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report_sections.inputs import BenchFile, Section, plot_label, require
from bench.report_sections.plots import bar_series, figure, grouped_bars, save
from bench.report_sections.tables import md_table, not_found, rel, source_line

TITLE = "Text adapter: lean vs eager vs compiled (`bench/adapter_throughput.py`)"
COLUMNS = [
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
]


def _config(r: dict[str, Any]) -> str:
    return f"B={r['batch']}\n{r['dim']}→{r.get('out')}"


def adapter_figure(bf: BenchFile, out_dir: Path, used: set[str]) -> Path:
    """fwd+bwd time and activation memory per batch and shape, one bar per implementation."""
    short, foot = plot_label(bf)
    palette: dict[str, str] = {}
    # "lean" runs the Triton kernels on CUDA and _C's row kernels on the CPU: the legend says which.
    lean_backend = next((r["backend"] for r in bf.rows if r["impl"] == "lean" and r.get("backend")), None)

    def impl(r: dict[str, Any]) -> str:
        return f"lean ({lean_backend})" if r["impl"] == "lean" and lean_backend else r["impl"]

    where = f"{bf.data['device']}, {bf.data['dtype']}, {bf.data.get('num_blocks', '?')} blocks"
    fig, (ax_t, ax_m) = figure(2, f"Text adapter forward+backward — {short} ({where})", foot)
    cats, times = bar_series(bf.rows, _config, impl, "fwdbwd_ms")
    grouped_bars(ax_t, cats, times, "fwd+bwd time (ms, median, log)", palette, log=True)
    ax_t.set_title("time (lower is better)", fontsize=10)
    memory = bar_series(bf.rows, _config, impl, "act_peak_mb")[1]
    grouped_bars(ax_m, cats, memory, "activation peak memory (MiB, log)", palette, log=True)
    ax_m.set_title("memory of one training step (lower is better)", fontsize=10)
    for ax in (ax_t, ax_m):
        ax.set_xlabel("batch and adapter shape (d_in→d_out)")
    return save(fig, out_dir, f"{bf.path.stem}_{bf.data['device']}_{bf.data['dtype']}", used)


def section_adapter(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    if not files:
        return not_found(TITLE, "adapter_throughput.py")
    plots, parts = [], []
    for bf in files:
        require(bf, ("rows", "device", "dtype"), ok_rows_need=("fwd_ms", "fwdbwd_ms"))
        plots.append(adapter_figure(bf, out_dir, used))
        parts += [source_line(bf), f"![adapter]({rel(plots[-1], out_dir)})", md_table(bf.rows, COLUMNS)]
    return Section(TITLE, "\n\n".join(parts), plots)
