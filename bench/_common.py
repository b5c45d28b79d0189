"""Measurement helpers shared by the benchmark scripts.

- :func:`time_fn`: median and 20/80% quantiles of a callable (``triton.testing.do_bench`` on CUDA,
  a ``perf_counter`` loop on CPU).
- :func:`run_point_in_subprocess`: run one benchmark point in a fresh Python process so its CPU peak
  memory is its own; reports peak RSS absolute and above a baseline the point marks after
  allocating its inputs, and ``"OOM"`` instead of crashing the sweep.
- :func:`cuda_peak_mb`, :func:`measured_matmul_tflops`, :func:`print_table`, :func:`write_json`.

A point function used with :func:`run_point_in_subprocess` is a module-level function that takes
JSON-able keyword arguments and returns a JSON-able dict; it calls :func:`mark_memory_baseline`
once its inputs exist, so ``peak_above_baseline_mb`` is the memory the measured code itself used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
_RESULT_MARK = "@@BENCH_RESULT@@"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    budget_s: float = 2.0,
) -> Timing:
    """Time ``fn()``; CUDA uses Triton's do_bench (cache flush, events), CPU a wall-clock loop.

    On CPU, runs ``warmup`` untimed calls, then at least ``min_reps`` and at most ``max_reps`` timed
    calls, stopping once ``budget_s`` of timed work has been spent.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=max(100, int(budget_s * 1000)))
        return Timing(float(med), float(p20), float(p80), reps=-1)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (len(times) < max_reps and spent < budget_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1000)
        spent += dt
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7], reps=len(times))


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """High-water resident set size of this process since start or the last reset (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


_BASELINE_MB: float | None = None


def mark_memory_baseline() -> float:
    """Reset the peak-RSS counter and remember the current RSS as the point's baseline (MiB).

    Writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0), so temporaries made while
    building inputs do not count as the measured code's peak.
    """
    global _BASELINE_MB
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # kernel without clear_refs: peak then includes set-up; the absolute figure stays true
    _BASELINE_MB = rss_mb()
    return _BASELINE_MB


def cpu_peak_allocated_mb(fn: Callable[[], Any]) -> float:
    """Run ``fn`` once; return the peak of the bytes its CPU tensors held above what was live before it
    (MiB): every allocation and free of torch's CPU allocator, read from the profiler's memory events.

    This is what :func:`cuda_peak_mb` measures on CUDA (the caching allocator's peak). Peak RSS is not:
    glibc keeps freed heap memory mapped, so the resident high-water mark of a step that follows a
    warm-up step says how much of the warm-up's freed memory the allocator reused, which varies by
    ±100 MiB from run to run of identical code (bench/stage2_throughput.py's docstring has the numbers).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # (time, arrival order, signed bytes): allocations are positive, frees negative.
    events = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(prof.profiler.kineto_results.events())
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def cuda_peak_mb(fn: Callable[[], Any], device: torch.device | str = "cuda") -> tuple[float, float]:
    """Run ``fn`` once; return (peak allocated MiB during it, allocated MiB before it)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**20
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20, before


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def _child_main(target: str, kwargs_json: str) -> None:
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        result = dict(func(**json.loads(kwargs_json)))
        result.setdefault("status", "ok")
    except Exception as exc:  # the sweep goes on; the point says what happened
        result = {"status": "OOM" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"}
    result["peak_rss_mb"] = peak_rss_mb()
    if _BASELINE_MB is not None:
        result["baseline_rss_mb"] = _BASELINE_MB
        result["peak_above_baseline_mb"] = max(0.0, result["peak_rss_mb"] - _BASELINE_MB)
    print(_RESULT_MARK + json.dumps(result), flush=True)


def run_point_in_subprocess(
    target: str, kwargs: dict[str, Any], *, timeout_s: float = 600, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``target`` ("package.module:function") with ``kwargs`` in a fresh interpreter.

    Returns the function's dict plus ``peak_rss_mb`` (and ``baseline_rss_mb``,
    ``peak_above_baseline_mb`` if the function called :func:`mark_memory_baseline`).
    A child killed by the OOM killer, or raising an out-of-memory error, gives ``status="OOM"``;
    a timeout gives ``status="timeout"``.
    """
    runner = "import sys; from bench._common import _child_main; _child_main(sys.argv[1], sys.argv[2])"
    cmd = [sys.executable, "-c", runner, target, json.dumps(kwargs)]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    child_env.update(env or {})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout_s}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    if proc.returncode in (-9, 137):
        return {"status": "OOM", "error": "killed (SIGKILL, likely the OOM killer)"}
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"status": "error", "returncode": proc.returncode, "error": tail}


def measured_matmul_tflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                           n: int | None = None) -> float:
    """This machine's measured square-matmul rate (TFLOP/s) for ``dtype``: the roofline to report against."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), device=device, budget_s=1.0)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Render rows as an aligned text table (missing values as '-'), print it and return it."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# CPU features that decide which GEMM paths are fast (bf16 on CPU needs avx512_bf16 or AMX).
_CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                          "amx_int8")
_LIBRARIES = ("torch", "triton", "transformers", "bitsandbytes", "numpy", "llm2clip_fast")


def _cpu_model_and_flags() -> tuple[str | None, list[str]]:
    """CPU model name and the GEMM-relevant flags from /proc/cpuinfo (None, [] where it is absent)."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    present = set(value.split())
                    flags = [flag for flag in _CPU_FLAGS_OF_INTEREST if flag in present]
                if model is not None and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or None, flags


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_description() -> dict[str, Any]:
    """What a result was measured on, for the report's plot labels.

    ``cpu_model``/``cpu_flags`` (GEMM-relevant flags only), ``gpu`` (+ ``cuda``, ``gpu_memory_gb``)
    where CUDA is present, ``libraries`` (installed versions), ``python``, ``git_commit`` of this
    checkout and ``date_utc`` (ISO 8601, when the description was taken).
    """
    cpu_model, cpu_flags = _cpu_model_and_flags()
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                            # the 1/5/15-minute load: on a shared machine, how much else was running
                            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                            "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model,
                            "cpu_flags": cpu_flags, "python": platform.python_version(),
                            "libraries": _library_versions(), "git_commit": _git_commit(),
                            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return info


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def run_cases_within_budget(cases: Sequence[tuple[str, Callable[[], dict]]], budget_s: float,
                            path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Run ``(name, measure)`` cases in order into ``doc["results"]`` (ok with its metrics, error with the
    exception, skipped once ``budget_s`` seconds have passed), rewriting ``path`` after every case so a run
    cut short keeps what it measured (the benches' ``run_gpu_stage``)."""
    start = time.monotonic()
    for name, fn in cases:
        if time.monotonic() - start > budget_s:
            doc["results"].append({"name": name, "status": "skipped", "note": "budget spent"})
            continue
        try:
            doc["results"].append({"name": name, "status": "ok", "metrics": fn()})
        except Exception as exc:  # one failed case must not lose the others' numbers
            doc["results"].append({"name": name, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
        write_json(path, doc)


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=default_out, help="where to write the JSON results")
