"""``--report-to``: where the trainers' scalars go besides ``log.jsonl``.

Every record the trainer logs at ``--log-every`` (loss, lr, throughput, grad norm, eval metrics) is
also sent, numeric values only, to each chosen reporter:

- ``csv``: ``RUN/scalars.csv`` in long form (``step,name,value``), one flushed row per scalar;
- ``tensorboard``: event files in ``RUN/tensorboard`` through ``torch.utils.tensorboard`` (needs the
  ``tensorboard`` package);
- ``wandb``: Weights & Biases, offline (files under ``RUN/wandb``) unless the user configured it
  (``WANDB_MODE``, ``WANDB_API_KEY`` or a saved login); one run id per run folder, so a resumed run
  continues the same W&B run;
- ``none``: only ``log.jsonl`` (the default).

Only rank 0 reports. On ``--resume`` the CSV drops rows past the checkpoint's step (as ``log.jsonl``
does) and TensorBoard purges events past it; a missing optional package is an error naming it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

from ..atomic_files import write_text_atomic
from ..missing_dependency import MissingDependencyError

REPORT_CHOICES = ("none", "csv", "tensorboard", "wandb")


def add_report_to_argument(parser: Any) -> None:
    parser.add_argument("--report-to", nargs="+", default=["none"], choices=REPORT_CHOICES, metavar="TARGET",
                        help="also send the logged scalars to: csv (RUN/scalars.csv), tensorboard "
                             "(RUN/tensorboard), wandb (offline unless configured), or none; several allowed")


# target -> the package it needs (checked before a run starts, not after the model is built)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(targets: list[str]) -> list[str]:
    """The distinct targets in order; ``none`` only alone; their packages installed.

    Raises ValueError naming the flag, or MissingDependencyError naming the package to install.
    """
    seen = list(dict.fromkeys(targets or ["none"]))
    bad = [t for t in seen if t not in REPORT_CHOICES]
    if bad:
        raise ValueError(f"--report-to: unknown {bad}; choose from {list(REPORT_CHOICES)}")
    if "none" in seen and len(seen) > 1:
        raise ValueError(f"--report-to: 'none' cannot be combined with {[t for t in seen if t != 'none']}")
    for target in seen:
        package = _PACKAGES.get(target)
        if package is not None:
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise MissingDependencyError(f"--report-to {target} needs the {package} package: "
                                             f"pip install {package}")
    return [t for t in seen if t != "none"]


class Reporter(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class CsvReporter:
    """``step,name,value`` rows appended to ``path`` (a resumed run first drops rows past its step)."""

    HEADER = ("step", "name", "value")

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[list[str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            for row in rows[1:]:
                # a row torn by a kill has fewer fields or no number: dropped like a torn JSON line
                if len(row) == 3 and row[0].lstrip("-").isdigit() and int(row[0]) <= resume_step:
                    kept.append(row)
        buf = io.StringIO()
        csv.writer(buf).writerows([list(self.HEADER), *kept])
        write_text_atomic(path, buf.getvalue())
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._writer.writerows([step, name, repr(value)] for name, value in scalars.items())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardReporter:
    """``add_scalar`` per value into ``log_dir``; events past ``resume_step`` are purged on resume."""

    def __init__(self, log_dir: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise MissingDependencyError(
                "--report-to tensorboard needs the tensorboard package: pip install tensorboard") from exc
        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


class WandbReporter:
    """One W&B run per run folder (its id kept in ``RUN/wandb_run_id``), offline unless configured."""

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise MissingDependencyError(
                "--report-to wandb needs the wandb package: pip install wandb") from exc
        id_file = run_dir / "wandb_run_id"
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            write_text_atomic(id_file, run_id + "\n")
        kwargs: dict[str, Any] = {
            "project": os.environ.get("WANDB_PROJECT", "llm2clip_fast"), "dir": str(run_dir),
            "name": run_dir.name, "id": run_id, "resume": "allow", "config": config,
        }
        if not _wandb_configured():
            kwargs["mode"] = "offline"  # never ask for a login or reach the network unasked
        self._wandb = wandb
        self._run = wandb.init(**kwargs)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


class ScalarReporters:
    """The reporters chosen by ``--report-to`` (none on ranks other than 0)."""

    def __init__(self, targets: list[str], run_dir: str | os.PathLike[str], *, resume_step: int | None = None,
                 config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        run_dir = Path(run_dir)
        self._reporters: list[Reporter] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for target in check_report_to(targets):
                if target == "csv":
                    self._reporters.append(CsvReporter(run_dir / "scalars.csv", resume_step))
                elif target == "tensorboard":
                    self._reporters.append(TensorBoardReporter(run_dir / "tensorboard", resume_step))
                elif target == "wandb":
                    self._reporters.append(WandbReporter(run_dir, config or {}, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        """Send the record's finite numeric values (not ``step``) at its ``step``."""
        if not self._reporters or "step" not in record:
            return
        scalars = {}
        for name, value in record.items():
            if name == "step":
                continue
            if hasattr(value, "item") and callable(value.item):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                scalars[name] = float(value)
        if scalars:
            for r in self._reporters:
                r.log(int(record["step"]), scalars)

    def close(self) -> None:
        for r in self._reporters:
            r.close()
        self._reporters = []
