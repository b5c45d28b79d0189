"""``summary.md``: one table of stages and, per stage, one row per result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _stage_table(docs: list[dict[str, Any]]) -> list[str]:
    lines = ["| stage | status | time (s) | limit (s) | results ok/all | what |",
             "| --- | --- | --- | --- | --- | --- |"]
    for doc in docs:
        res = doc.get("results", [])
        good = sum(r["status"] in ("ok", "skipped") for r in res)
        el = doc.get("elapsed_s")
        lines.append(f"| {doc['stage']} | **{doc['status']}** | {fmt(el) if el is not None else '-'} | "
                     f"{fmt(doc.get('timeout_s'))} | {good}/{len(res)} | {doc.get('title', '')} |")
    return lines


def _stage_details(doc: dict[str, Any]) -> list[str]:
    lines = ["", f"## {doc['stage']}: {doc['status']}", ""]
    lines += [f"- {n}" for n in doc.get("notes", [])]
    if doc.get("results"):
        lines += ["| result | status | metrics | note |", "| --- | --- | --- | --- |"]
        for r in doc["results"]:
            metrics = ", ".join(f"{k}={fmt(v)}" for k, v in r.get("metrics", {}).items())
            note = str(r.get("note", "")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['name']} | {r['status']} | {metrics} | {note} |")
    if doc.get("error"):
        lines += ["", "```", doc["error"].rstrip(), "```"]
    return lines


def render_summary(docs: list[dict[str, Any]], quick: bool) -> str:
    head = " (--quick: tiny sizes on CPU, Triton interpreter)" if quick else ""
    lines = ["# llm2clip_fast GPU check" + head, "", *_stage_table(docs)]
    for doc in docs:
        lines += _stage_details(doc)
    return "\n".join(lines) + "\n"


def write_summary(out: Path, docs: list[dict[str, Any]], quick: bool) -> Path:
    path = out / "summary.md"
    tmp = out / ".summary.md.tmp"
    tmp.write_text(render_summary(docs, quick))
    os.replace(tmp, path)
    return path
