"""Section: bench JSON no other section knows (e.g. a cache bench): its scalars and a table of its rows."""

from __future__ import annotations

from pathlib import Path

from bench.report_sections.inputs import BenchFile, Section
from bench.report_sections.tables import fmt, md_table, source_line

MAX_COLUMNS = 12


def _other_file(bf: BenchFile) -> list[str]:
    name = bf.data.get("bench") or bf.path.stem
    scalars = {k: v for k, v in bf.data.items() if isinstance(v, (str, int, float, bool)) and k != "bench"}
    parts = [
        f"### {name}\n\n{source_line(bf)}"
        + ("\n\n" + ", ".join(f"{k}: {fmt(v)}" for k, v in scalars.items()) if scalars else "")
    ]
    rows = [r for r in bf.rows if isinstance(r, dict)] if isinstance(bf.data.get("rows"), list) else []
    if rows:
        # Columns: every key whose values are all scalars, in first-seen order, errors left out.
        keys = [
            k
            for k in dict.fromkeys(k for r in rows for k in r)
            if all(isinstance(r.get(k), (str, int, float, bool, type(None))) for r in rows)
            and k not in ("error",)
        ][:MAX_COLUMNS]
        parts.append(md_table(rows, [(k, k) for k in keys]))
    return parts


def section_other(files: list[BenchFile], out_dir: Path) -> Section | None:
    """Bench JSON no reader above knows (e.g. a cache bench): its scalar keys and a table of its rows."""
    if not files:
        return None
    parts = [part for bf in files for part in _other_file(bf)]
    return Section("Other bench results", "\n\n".join(parts), [])
