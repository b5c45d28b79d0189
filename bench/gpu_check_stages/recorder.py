"""A stage's results as they come: its JSON file, rewritten (atomically) after every result."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_check_stages.plan import SCHEMA, Stage


class Recorder:
    """Collects a stage's results and rewrites its JSON file after each one (atomic writes)."""

    def __init__(self, out: Path, stage: Stage, quick: bool, device: str) -> None:
        self.path = out / f"{stage.name}.json"
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "stage": stage.name, "title": stage.title, "status": "running",
            "quick": quick, "device": device,
            "timeout_s": stage.quick_budget_s if quick else stage.budget_s,
            "elapsed_s": None, "returncode": None, "notes": [], "error": None, "results": [],
        }
        self.flush()

    def flush(self) -> None:
        from bench._common import write_json

        write_json(self.path, self.doc)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.doc["notes"].append(text)
        self.flush()

    def add(self, name: str, status: str, note: str = "", /, **metrics: Any) -> None:
        # positional-only: a metric may itself be called name, status or note (the GPU's name)
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        print(f"{status:7s} {name}: {clean} {note}", flush=True)
        self.doc["results"].append({"name": name, "status": status, "metrics": clean, "note": note})
        self.flush()

    def add_error(self, name: str, exc: Exception) -> None:
        """An error row for ``name`` saying what ``exc`` was (its last 600 characters)."""
        self.add(name, "error", note=f"{type(exc).__name__}: {exc}"[-600:])

    def add_metrics(self, name: str, metrics: dict[str, Any]) -> None:
        """A row from a metrics dict that may hold ``status`` (default ok) and ``note``."""
        status = metrics.pop("status", "ok")
        note = metrics.pop("note", "")
        self.add(name, status, note, **metrics)

    def attempt(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run ``fn`` (returns metrics, may hold ``status`` and ``note``); an exception is an error row."""
        try:
            metrics = dict(fn())
        except Exception as exc:
            self.add_error(name, exc)
            traceback.print_exc()
            return
        self.add_metrics(name, metrics)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    try:
        f = float(v)
        return f if math.isfinite(f) else str(f)
    except (TypeError, ValueError):
        return str(v)
