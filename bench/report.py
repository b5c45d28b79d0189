"""One benchmark report: ``report.md`` plus PNG plots from the JSON the ``bench/`` scripts write.

    python bench/report.py --in bench/results --out report/       # report what was measured
    python bench/report.py --quick --out /tmp/report               # run every bench --quick, then report

Reads every ``*.json`` under each ``--in`` folder (recursively) and recognises it by its content:

- ``loss_throughput.py`` (CLIP and ``--loss siglip``): fwd+bwd time and peak memory against B (log-log),
  one line per provider, OOM/error points marked; achieved TFLOP/s against B with the measured matmul
  rate as the roofline; one figure per (loss, device, dtype, D);
- ``distributed_memory.py``: the worst rank's peak memory against the global batch, one line per
  (provider, ranks);
- ``adapter_throughput.py``: fwd+bwd time, activation memory and fidelity, lean vs eager vs compiled;
- ``embed_throughput.py``: captions/s, weight memory and fidelity per precision and 8-bit mode;
- ``train_throughput.py --stage 1`` and ``stage2_throughput.py``: step throughput and step memory;
- ``gpu_check.py``: its ``summary.md`` verbatim and a line per stage JSON (schema-tolerant);
- any other bench JSON with a ``rows`` list (e.g. a cache bench): a table.

Each plot names the machine (CPU model and flags or GPU name, library versions) and the date. A section
whose JSON is absent is skipped with a line saying what was not found; a file that is not valid JSON,
or a recognised file that lacks what its bench always writes, is an error naming the file.
``--quick`` first runs each bench script with ``--quick`` (into ``OUT/results``), so CI exercises the
whole path from measurement to report; it exits 1 if a bench failed, after writing the report.

The code: this file is the command line and the ``--quick`` runs; reading, tables, plots, one module per
section and report.md itself are in ``bench/report_sections/`` (its ``__init__`` lists them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench.report_sections.document import build_report
from bench.report_sections.inputs import BenchFile, ReportInputError, Section, classify, load_inputs
from bench.report_sections.plots import PNG_SIGNATURE
from bench.report_sections.tables import md_table

# What tests and other scripts use from here, besides main.
__all__ = ["PNG_SIGNATURE", "BenchFile", "ReportInputError", "Section", "build_report", "classify",
           "load_inputs", "main", "md_table", "run_quick_benches"]

BENCH_DIR = Path(__file__).resolve().parent

# The --quick run: (script, extra args, output name; None means the script takes a folder as --out).
QUICK_RUNS: list[tuple[str, list[str], str | None]] = [
    ("loss_throughput.py", [], "loss_throughput.json"),
    ("loss_throughput.py", ["--loss", "siglip"], "loss_throughput_siglip.json"),
    ("distributed_memory.py", [], "distributed_memory.json"),
    ("adapter_throughput.py", [], "adapter_throughput.json"),
    ("embed_throughput.py", [], "embed_throughput.json"),
    ("train_throughput.py", ["--stage", "1"], "train_throughput_stage1.json"),
    ("stage2_throughput.py", [], "stage2_throughput.json"),
    ("cache_throughput.py", [], "cache_throughput.json"),
    ("gpu_check.py", [], None),
]


def _run_quick_bench(script: str, extra: list[str], out: Path, log: Path, env: dict[str, str],
                     timeout_s: float) -> str | None:
    """One bench script with ``--quick --out OUT``, output to ``log``; a note if it failed, else None."""
    tag = script + (" " + " ".join(extra) if extra else "")
    cmd = [sys.executable, str(BENCH_DIR / script), *extra, "--quick", "--out", str(out)]
    t0 = time.perf_counter()
    print(f"running {tag} --quick ...", flush=True)
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"bench/{tag} --quick timed out after {timeout_s:g} s (log: `{log}`)."
    rc = proc.returncode
    print(f"  rc={rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return f"bench/{tag} --quick exited with {rc} (log: `{log}`)." if rc != 0 else None


def run_quick_benches(results: Path, timeout_s: float, only: Sequence[str] | None = None) -> list[str]:
    """Run each bench script that exists with ``--quick`` into ``results``; return one note per problem."""
    results.mkdir(parents=True, exist_ok=True)
    notes = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR.parent), env.get("PYTHONPATH")]))
    for script, extra, out_name in QUICK_RUNS:
        if only and script.removesuffix(".py") not in only:
            continue
        if not (BENCH_DIR / script).exists():
            notes.append(f"bench/{script} does not exist here; not run.")
            continue
        out = results / (out_name or script.removesuffix(".py"))
        problem = _run_quick_bench(script, extra, out, results / f"{out.stem}.log", env, timeout_s)
        if problem:
            notes.append(problem)
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--in",
        dest="inputs",
        type=Path,
        nargs="+",
        default=None,
        help="folders holding bench JSON (default: bench/results, or OUT/results with --quick)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and the PNG plots")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="first run every bench script with --quick into OUT/results (CI smoke run)",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="with --quick: run only these scripts (names without .py)"
    )
    parser.add_argument("--note", default="", help='said on every plot and atop report.md, e.g. "under load"')
    parser.add_argument("--bench-timeout-s", type=float, default=900, help="with --quick: per script")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    known = {script.removesuffix(".py") for script, _, _ in QUICK_RUNS}
    if args.only and set(args.only) - known:
        parser.error(f"--only: unknown {sorted(set(args.only) - known)}; choose from {sorted(known)}")
    notes: list[str] = []
    folders = list(args.inputs or [])
    if args.quick:
        results = args.out / "results"
        notes = run_quick_benches(results, args.bench_timeout_s, args.only)
        folders.append(results)
    elif not folders:
        folders = [BENCH_DIR / "results"]
    try:
        path = build_report(folders, args.out, notes=notes, plot_note=args.note)
    except ReportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    return 1 if notes and any("exited" in n or "timed out" in n for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
