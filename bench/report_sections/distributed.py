"""Section: the global-batch loss's per-rank memory against the global batch
(``bench/distributed_memory.py``), one line per (provider, ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report_sections.inputs import (
    OK,
    BenchFile,
    Section,
    machine_label,
    plot_label,
    require,
    status,
    without_commit,
)
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
from bench.report_sections.tables import md_table, not_found, rel

TITLE = "Global-batch loss: memory per rank (`bench/distributed_memory.py`)"
SUMMARY_COLUMNS = [
    ("loss", "loss"),
    ("B", "global B"),
    ("D", "D"),
    ("world", "ranks"),
    ("global_peak_mb", "global MiB"),
    ("openclip_peak_mb", "OpenCLIP-style MiB"),
    ("ratio", "ratio"),
    ("target", "target ≤"),
]
POINT_COLUMNS = [
    ("provider", "provider"),
    ("world", "ranks"),
    ("B", "global B"),
    ("D", "D"),
    ("status", "status"),
    ("peak_mb", "worst-rank peak MiB"),
    ("inputs_mb", "inputs/rank MiB"),
    ("step_s", "step s"),
]
Points = dict[tuple[int, str, int, int], dict[str, Any]]  # (D, provider, world, B) -> worst rank


def worst_rank_points(files: list[BenchFile]) -> Points:
    """Per (D, provider, world, B): the worst rank's peak memory and step time, or its failure."""
    points: Points = {}
    for bf in files:
        require(bf, ("rows", "world", "B", "D"), ok_rows_need=("peak_above_baseline_mb", "step_s"))
        for row in bf.rows:
            key = (row["D"], row["provider"], row["world"], row["B"])
            cur = points.setdefault(key, {
                "provider": row["provider"], "world": row["world"], "B": row["B"], "D": row["D"],
                "status": OK, "peak_mb": 0.0, "step_s": 0.0, "inputs_mb": row.get("inputs_mb"), "file": bf,
            })
            if status(row) != OK:
                cur["status"] = status(row)
                continue
            cur["peak_mb"] = max(cur["peak_mb"], row["peak_above_baseline_mb"])
            cur["step_s"] = max(cur["step_s"], row["step_s"])
    return points


def _provider_lines(ax, mine: Points, worlds: list[int], styles: dict[int, str]) -> tuple[list, list]:
    """One line per (provider, ranks); returns (failed points, plotted values)."""
    palette: dict[str, str] = {}
    values, failures = [], []
    for provider in dict.fromkeys(k[1] for k in mine):
        col = colour(provider, palette)
        for world in worlds:
            pts = sorted((k[3], v) for k, v in mine.items() if k[1] == provider and k[2] == world)
            ok = [(b, max(v["peak_mb"], MEMORY_FLOOR_MB)) for b, v in pts if v["status"] == OK]
            failures += [(b, v["status"], col) for b, v in pts if v["status"] != OK]
            if ok:
                ax.plot(*zip(*ok), marker="o", color=col, linestyle=styles[world],
                        label=f"{provider}, {world} ranks")
                values += [y for _, y in ok]
    return failures, values


def _inputs_lines(ax, mine: Points, worlds: list[int], styles: dict[int, str]) -> None:
    """Each rank's own inputs against the global batch, one thin black line per world size."""
    inputs = sorted({(k[3], k[2]): v["inputs_mb"] for k, v in mine.items() if v.get("inputs_mb")}.items())
    for world in worlds:
        pts = [(b, mb) for (b, w), mb in inputs if w == world]
        if pts:
            ax.plot(*zip(*pts), color="black", linestyle=styles[world], linewidth=0.8, alpha=0.6,
                    label=f"inputs per rank, {world} ranks")


def memory_figure(points: Points, dim: int, out_dir: Path, used: set[str]) -> Path:
    """The worst rank's peak above its inputs against the global batch at one D."""
    mine = {k: v for k, v in points.items() if k[0] == dim}
    short, foot = plot_label(next(iter(mine.values()))["file"])
    worlds = sorted({k[2] for k in mine})
    styles = dict(zip(worlds, ["-", "--", "-.", ":"] * 4))
    fig, (ax,) = figure(1, f"Global-batch loss, per-rank peak memory — {short}", foot, width=9.5, height=4.8)
    ax.set_title(f"gloo, D={dim}; worst rank's peak above its inputs", fontsize=9)
    failures, values = _provider_lines(ax, mine, worlds, styles)
    _inputs_lines(ax, mine, worlds, styles)
    batch_x(ax, sorted({k[3] for k in mine}), "global batch B (log scale)")
    log_y(ax)
    mark_failures(ax, failures, max(values) * 3 if values else 1.0)
    ax.set_ylabel("per-rank peak memory above inputs (MiB)")
    ax.grid(alpha=0.3, which="both")
    legend_with_failures(ax, failures, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, out_dir, f"distributed_memory_D{dim}", used)


def _summary_table(files: list[BenchFile]) -> str | None:
    """Worst rank, global-batch loss against OpenCLIP-style gathering, per loss, B, D and ranks."""
    summary: list[dict[str, Any]] = []
    for bf in files:
        for loss, s in (bf.data.get("summary") or {}).items():
            d = bf.data
            summary.append({"loss": loss, "B": d["B"], "D": d["D"], "world": d["world"], **s})
    if not summary:
        return None
    summary.sort(key=lambda r: (r["loss"], r["D"], r["B"], r["world"]))
    return ("Worst rank, global-batch loss against OpenCLIP-style gathering:\n\n"
            + md_table(summary, SUMMARY_COLUMNS))


def _sources(files: list[BenchFile]) -> list[str]:
    """One line per machine (a sweep across commits is one machine) naming its files."""
    by_machine: dict[str, list[str]] = {}
    for bf in files:
        by_machine.setdefault(without_commit(machine_label(bf)[1]), []).append(f"`{bf.path}`")
    return [f"Sources: {', '.join(paths)}; machine: {m}." for m, paths in by_machine.items()]


def section_distributed(files: list[BenchFile], out_dir: Path, used: set[str]) -> Section:
    if not files:
        return not_found(TITLE, "distributed_memory.py")
    points = worst_rank_points(files)
    plots, parts = [], []
    for dim in sorted({k[0] for k in points}):
        plots.append(memory_figure(points, dim, out_dir, used))
        parts.append(f"![distributed memory D={dim}]({rel(plots[-1], out_dir)})")
    parts += _sources(files)
    summary = _summary_table(files)
    if summary:
        parts.append(summary)
    table = sorted(points.values(), key=lambda r: (r["D"], r["B"], r["world"], r["provider"]))
    parts.append(md_table(table, POINT_COLUMNS))
    return Section(TITLE, "\n\n".join(parts), plots)
