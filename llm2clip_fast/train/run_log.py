"""Run logging shared by the trainers: a JSON-lines log, a progress bar, a loss-curve PNG.

- :class:`JsonlLog` appends one JSON object per line, flushed per line so a killed run keeps
  everything it logged. Opened with ``resume_step=S`` it first drops records of steps after S (the
  part of an interrupted run that the resumed run will redo), so the log has no duplicate steps.
- :class:`TrainProgress` is a tqdm bar showing loss, lr and items/s (e.g. captions/s, images/s).
- :func:`plot_loss_curve` draws the JSON log's loss (and lr) against step into a PNG, written
  atomically, with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic_files import write_stream_atomic, write_text_atomic

logger = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (process killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(s.strip() for s in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors, numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/nan; keep the information as a string
    return value


class JsonlLog:
    """Append-only JSON-lines log.

    path: the log file (created with its folder). resume_step: when resuming from a checkpoint at
    this step, records with ``step > resume_step`` are dropped first (atomic rewrite); None starts a
    fresh log, replacing any existing file. enabled: False makes every call a no-op (non-zero ranks).
    mirror: also given every record and closed with the log (``--report-to``'s ScalarReporters).
    """

    def __init__(self, path: str | os.PathLike[str], *, resume_step: int | None = None,
                 enabled: bool = True, mirror: Any = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        # --report-to: an object with log(record) and close() that gets every record too
        self._mirror = mirror if enabled else None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text_atomic(self.path, "")
        else:
            kept = [r for r in read_jsonl(self.path) if int(r.get("step", -1)) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # kept open: one flush per record

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (values: numbers, strings, 0-d tensors; inf/nan kept as strings)."""
        if self._file is None:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._mirror is not None:
            self._mirror.log(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainProgress:
    """tqdm bar over optimizer steps showing loss, lr and items/s over a sliding window.

    total: total steps. initial: steps already done (resume). unit_name: what items are
    ("captions", "images"). enabled: False for non-zero ranks or quiet runs.
    """

    def __init__(self, total: int, *, initial: int = 0, unit_name: str = "items", desc: str = "train",
                 enabled: bool = True, window: int = 20) -> None:
        self.unit_name = unit_name
        self._window: deque[tuple[float, int]] = deque(maxlen=window)
        self._window.append((time.perf_counter(), 0))
        self._items = 0
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not enabled, file=sys.stderr)

    def items_per_second(self) -> float:
        """Throughput over the last ``window`` updates."""
        (t0, n0), (t1, n1) = self._window[0], self._window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def update(self, items: int, *, loss: float | None = None, lr: float | None = None,
               steps: int = 1) -> float:
        """Record ``steps`` finished steps covering ``items`` items; returns the current items/s."""
        self._items += items
        self._window.append((time.perf_counter(), self._items))
        rate = self.items_per_second()
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        postfix[f"{self.unit_name}/s"] = f"{rate:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(steps)
        return rate

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_loss_curve(log_path: str | os.PathLike[str], png_path: str | os.PathLike[str], *,
                    key: str = "loss", title: str | None = None) -> Path | None:
    """Draw ``key`` (and ``lr`` on a second axis, if logged) against ``step`` from a JSON-lines log.

    Only records that have both ``step`` and a finite numeric ``key`` are drawn. Raises ValueError
    when there is none. Returns the PNG path, or None (with a logged warning) when matplotlib is not
    installed: the plot is a convenience, and a run must still write its summary after the model.
    """
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib, or "
                       "'llm2clip_fast[train]')", Path(png_path).name)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(log_path)
               if isinstance(r.get(key), (int, float)) and "step" in r and math.isfinite(r[key])]
    if not records:
        raise ValueError(f"{log_path}: no records with 'step' and a numeric {key!r} to plot")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot([r["step"] for r in records], [r[key] for r in records], color="tab:blue", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(key, color="tab:blue")
        ax.grid(alpha=0.3)
        lr_records = [r for r in records if isinstance(r.get("lr"), (int, float))]
        if lr_records:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in lr_records], [r["lr"] for r in lr_records], color="tab:orange",
                     alpha=0.6, label="lr")
            ax2.set_ylabel("lr", color="tab:orange")
        ax.set_title(title or Path(log_path).parent.name)
        fig.tight_layout()
        write_stream_atomic(png_path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return png_path
