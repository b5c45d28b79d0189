"""Markdown pieces every section uses: value formatting, tables, source lines, "not found" sections."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report_sections.inputs import OK, BenchFile, Section, machine_label, status


def fmt(v: Any, digits: int = 3) -> str:
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
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    failures = []
    for r in rows:
        error = str(r.get("error") or "").strip()
        if status(r) != OK and error:
            name = ", ".join(fmt(r.get(k)) for k, _ in columns[:3])
            failures.append(f"- {name}: {status(r)}: `{error.splitlines()[-1][:200].replace('`', chr(39))}`")
    if failures:
        lines += ["", "Not measured:", "", *failures]
    return "\n".join(lines)


def rel(path: Path, out_dir: Path) -> str:
    return os.path.relpath(path, out_dir)


def source_line(bf: BenchFile) -> str:
    return f"Source: `{bf.path}`; machine: {machine_label(bf)[1]}."


def not_found(title: str, script: str) -> Section:
    """The section for a bench whose JSON is absent: one line saying so."""
    return Section(
        title, f"_Not found: no JSON from `bench/{script}` in the input folders; section skipped._", []
    )
