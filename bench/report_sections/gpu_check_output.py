"""Section: ``bench/gpu_check.py``'s output, its ``summary.md`` verbatim and a line per stage JSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report_sections.inputs import OK, BenchFile, Section
from bench.report_sections.tables import fmt

TITLE = "GPU check (`bench/gpu_check.py`)"


def demote_headings(markdown: str, levels: int = 2) -> str:
    """``markdown`` with every ATX heading outside code fences ``levels`` deeper (# -> ###)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _stage_line(bf: BenchFile) -> str:
    """One line for a stage file, from whichever of the commonly present keys it has."""
    d: dict[str, Any] = bf.data
    stage = d.get("stage") or d.get("name") or bf.path.stem
    status = next((d[k] for k in ("status", "ok", "passed", "result") if k in d), None)
    elapsed = next((d[k] for k in ("elapsed_s", "wall_s", "seconds", "duration_s") if k in d), None)
    extra = f", {fmt(elapsed)} s" if isinstance(elapsed, (int, float)) else ""
    results = d.get("results")
    if isinstance(results, list) and results:
        states = [r.get("status") if isinstance(r, dict) else None for r in results]
        extra += f", results: {states.count(OK)} ok, {states.count('skipped')} skipped, {len(states)} in all"
    if isinstance(d.get("title"), str):
        extra += f" ({d['title']})"
    return f"- `{bf.path.name}`: stage {fmt(stage)}, status {fmt(status)}{extra}"


def read_gpu_check(folders: Sequence[Path], files: Sequence[BenchFile]) -> Section:
    """gpu_check's summary.md verbatim and one line per stage JSON; assumes no schema beyond a JSON object.

    Kept apart from the other readers: gpu_check's format is its own (``llm2clip_fast.gpu_check/1``),
    so only keys that are commonly present (``stage``/``name``, ``status``/``ok``/``passed``,
    ``elapsed_s``/``wall_s``, a ``results`` list with per-result ``status``, ``title``) are looked for,
    each optional, and whatever else a stage holds is left to summary.md and its own file.
    """
    if not folders and not files:
        return Section(
            TITLE,
            "_Not found: no `bench/gpu_check.py` output (a folder with `summary.md` or a "
            "`gpu_check*.json`) in the input folders; section skipped. H200 numbers are "
            "measured by it._",
            [],
        )
    parts = [
        f"From `{folder}` (`summary.md` verbatim, its headings two levels down to sit in this section):"
        f"\n\n{demote_headings((folder / 'summary.md').read_text().rstrip())}"
        for folder in folders
    ]
    lines = [_stage_line(bf) for bf in files]
    if lines:
        parts.append("Stage files:\n\n" + "\n".join(lines))
    return Section(TITLE, "\n\n".join(parts), [])
