"""Sections: whole training steps, stage 1 (``bench/train_throughput.py --stage 1``) and stage 2
(``bench/stage2_throughput.py``): step throughput and step memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report_sections.inputs import BenchFile, Section, plot_label, require
from bench.report_sections.plots import bar_series, figure, grouped_bars, save
from bench.report_sections.tables import md_table, not_found, rel, source_line


@dataclass(frozen=True)
class StepBench:
    """What differs between the two step sections: the bench, its grouping, series and rate."""

    title: str
    script: str
    group: Callable[[dict[str, Any]], str]
    series_key: str
    rate_key: str
    rate_label: str
    columns: list[tuple[str, str]]


STAGE1 = StepBench(
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
STAGE2 = StepBench(
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


def step_figure(bf: BenchFile, spec: StepBench, out_dir: Path, used: set[str]) -> Path:
    """Step throughput and step peak memory per group, one bar per series."""
    short, foot = plot_label(bf)
    palette: dict[str, str] = {}

    def name(r: dict[str, Any]) -> str:
        return str(r[spec.series_key])

    cats, rates = bar_series(bf.rows, spec.group, name, spec.rate_key)
    memory = bar_series(bf.rows, spec.group, name, "step_peak_mb")[1]
    fig, (ax_r, ax_m) = figure(2, f"{spec.title.split(' (')[0]} — {short} ({bf.data['device']})", foot)
    grouped_bars(ax_r, cats, rates, spec.rate_label, palette)
    ax_r.set_title("throughput (higher is better)", fontsize=10)
    grouped_bars(ax_m, cats, memory, "step peak memory above weights+state (MiB)", palette)
    ax_m.set_title("memory of one step (lower is better)", fontsize=10)
    return save(fig, out_dir, f"{bf.path.stem}_{bf.data['device']}", used)


def step_section(files: list[BenchFile], spec: StepBench, out_dir: Path, used: set[str]) -> Section:
    if not files:
        return not_found(spec.title, spec.script)
    plots, parts = [], []
    for bf in files:
        require(bf, ("rows", "device"), ok_rows_need=(spec.rate_key, "step_ms"))
        plots.append(step_figure(bf, spec, out_dir, used))
        parts += [source_line(bf), f"![step]({rel(plots[-1], out_dir)})", md_table(bf.rows, spec.columns)]
    return Section(spec.title, "\n\n".join(parts), plots)


def section_train1(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    return step_section(files, STAGE1, out_dir, used)


def section_stage2(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    return step_section(files, STAGE2, out_dir, used)
