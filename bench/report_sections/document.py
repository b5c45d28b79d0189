"""``report.md``: the header (inputs, notes, machines), the contents line, then every section in order."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from bench.report_sections.adapter import section_adapter
from bench.report_sections.distributed import section_distributed
from bench.report_sections.embed import section_embed
from bench.report_sections.gpu_check_output import read_gpu_check
from bench.report_sections.inputs import (
    BenchFile,
    ReportInputError,
    Section,
    load_inputs,
    machine_label,
    without_commit,
)
from bench.report_sections.loss import section_loss
from bench.report_sections.other import section_other
from bench.report_sections.train_steps import section_stage2, section_train1


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
    sections = build_sections(files, gpu_dirs, out_dir)
    lines = _header(folders, files, notes, sections)
    for s in sections:
        lines += [f"## {s.title}", "", s.body, ""]
    path = out_dir / "report.md"
    _write_atomic(path, "\n".join(lines))
    return path


def build_sections(files: list[BenchFile], gpu_dirs: list[Path], out_dir: Path) -> list[Section]:
    """Every section in report order; content a section cannot use is an error naming its files."""
    used: set[str] = set()

    def of(kind: str) -> list[BenchFile]:
        return [f for f in files if f.kind == kind]

    def build(kind: str, make: Callable[[list[BenchFile]], Section]) -> Section:
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
    return sections


def _header(folders: Sequence[Path], files: list[BenchFile], notes: list[str],
            sections: list[Section]) -> list[str]:
    # One line per machine: a sweep run across several commits is still one machine.
    machines = sorted({without_commit(machine_label(f)[1]) for f in files if f.kind != "gpu_check"})
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
        "Contents: " + ", ".join(f"[{s.title.split(' (')[0]}](#{anchor(s.title)})" for s in sections),
        "",
    ]
    return lines


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
