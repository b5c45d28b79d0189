"""Stages owned by other bench scripts: ``stage2_step``, ``embed`` and ``adapter``.

Each runs its script's ``gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str,
Callable[[], dict]]]``: the (name, run) pairs of the stage in order; ``run()`` returns the result's
metrics (flat: str/int/float/bool; optional ``status`` in ok/fail/skipped and ``note``). A script that
lacks it makes its stage an error saying so.
"""

from __future__ import annotations

import importlib
from typing import Any

from bench.gpu_check_stages.recorder import Recorder

DELEGATED = {"stage2_step": "bench.stage2_throughput", "embed": "bench.embed_throughput",
             "adapter": "bench.adapter_throughput"}
POINTS_FUNCTION = "gpu_check_points"


def run_delegated_stage(rec: Recorder, dev: Any, module_name: str, quick: bool) -> None:
    """Run ``module_name``'s ``gpu_check_points(device, quick)``: (name, run) pairs, one result each."""
    module = importlib.import_module(module_name)
    points = getattr(module, POINTS_FUNCTION, None)
    if points is None:
        rec.add(f"{module_name}.{POINTS_FUNCTION}", "error",
                note=f"{module_name.replace('.', '/')}.py defines no {POINTS_FUNCTION}(device, quick); "
                     "this stage runs what it returns")
        return
    for name, run in points(dev, quick):
        rec.attempt(name, run)
