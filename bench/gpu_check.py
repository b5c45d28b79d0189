"""One-shot GPU check, sized for a 15-minute GPU window: is every GPU path right, and how fast is it.

    pip install --no-build-isolation --no-deps -e .                  # on a fresh box: builds _C and _cuda
    python bench/gpu_check.py --plan                                  # the stages, their seconds, the total
    python bench/gpu_check.py --out gpu_check_out --wheels .whl       # the check (CUDA), peers from wheels
    python bench/gpu_check.py --out /tmp/gc --stages loss_compare     # a subset
    python bench/gpu_check.py --out /tmp/gc --quick                   # the same code: tiny, CPU, interpreter

A lent GPU machine (15 minutes of device time, machine start ~1.5 min and build ~1 min included, one
command at most 10 minutes) runs the default plan in one call: build, then this script with its
default budget of 8 minutes. Whoever has a GPU runs the default plan.

Stages run in priority order, each in its own process under its time budget (seconds, CUDA run);
the first seven sum to at most 7.5 minutes and ``gpu_tests`` gets what is left of ``--budget-s``
(a longer window runs it whole). A stage's results are written as they come (one JSON file per
stage, rewritten after every result) and ``summary.md`` after every stage, so a run cut short still
reports everything it measured.

==============  =====  =====================================================================================
env             10     GPU name, clocks, versions (the peers' too), ``python -m llm2clip_fast.info``
correctness     60     first calls in a fresh process, forced Triton: CLIP (keep-logits and recompute) and
                       SigLIP (one-pass and two-pass) at B=8192, D=1024 in bf16 and fp16, loss and every
                       gradient against float64; the single-stream schedule; adapter and masked mean pool;
                       the distributed losses' single-rank path
loss_compare    120    bf16 matmul rate; CLIP and SigLIP fwd+bwd at B=65536 then 8192, D=1024, bf16: fused
                       (both CLIP paths) beside OpenCLIP as written, the one-GEMM plain loss (eager,
                       compiled), Inf-CL and siglip-kernel, each with its FLOP convention, share of the
                       matmul rate, peak memory and float64 error; per piece: the chunk GEMMs alone against
                       GEMM + epilogue, overlapped and not; the autotuned epilogue configs; the goals of
                       issue 24 met or missed
stage2_step     90     ``bench/stage2_throughput.py``'s :func:`gpu_check_points` (a stage-2 training step)
embed           75     ``bench/embed_throughput.py``'s :func:`gpu_check_points` (8B-shaped LLM, 16 vs 8 bit)
adapter         45     ``bench/adapter_throughput.py``'s :func:`gpu_check_points` (the text adapter)
clip_1m         40     CLIP at B=1,048,576, D=1024 bf16: path, finite loss and gradients, peak memory above
                       the inputs, time; row and column log-sum-exp recomputed for sampled rows
gpu_tests       rest   ``pytest -m gpu`` on the test files that carry the marker, per-test time limit
==============  =====  =====================================================================================

**Stages owned by other scripts.** ``stage2_step``, ``embed`` and ``adapter`` call one function of their
bench script, ``gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[],
dict]]]``: the (name, run) pairs of the stage in order; ``run()`` returns the result's metrics (flat:
str/int/float/bool; optional ``status`` in ok/fail/skipped and ``note``). A script that lacks it
makes its stage an error saying so.

**Peers.** Inf-CL and siglip-kernel are not dependencies and the GPU machine has no internet: their
wheels travel with the call (``pip download --no-deps inf-cl==1.2.1 siglip-kernel==0.1.2 -d .whl`` here,
``.whl/`` is git-ignored and named in the call's ``carry``); ``--wheels .whl`` installs them with
``pip install --no-index --no-deps --target OUT/peer_site`` and puts that folder on the stages' path.
Without them their rows are ``skipped`` with the reason.

``--quick`` runs every stage with tiny sizes on CPU with ``TRITON_INTERPRET=1`` (the same code, so
the check cannot rot; ``tests/bench/test_bench_quick.py`` runs it).

Stage file schema (``DIR/<stage>.json``, schema id ``llm2clip_fast.gpu_check/1``)::

    {
      "schema": "llm2clip_fast.gpu_check/1",
      "stage": "correctness",            # stage name (table above)
      "title": "...",                    # one line saying what the stage does
      "status": "ok",                    # ok | fail (a check failed) | error (the stage crashed) |
                                         # timeout (killed at timeout_s) | skipped | running
      "quick": false,
      "device": "cuda",                  # cuda | cpu
      "timeout_s": 60.0,
      "elapsed_s": 41.2,                 # wall time of the stage process (null while running)
      "returncode": 0,                   # of the stage process (null if killed or not started)
      "notes": ["..."],                  # free-text remarks (e.g. a part skipped and why)
      "error": null,                     # last lines of the stage's stderr when status is error/timeout
      "results": [                       # one entry per measurement or check, in the order made
        {"name": "clip bf16 B=8192 D=1024 keep-logits",
         "status": "ok",                 # ok | fail | error | skipped
         "metrics": {"loss_err": 1e-4, "backend": "triton", ...},   # flat: str | int | float | bool
         "note": ""}
      ]
    }

A stage's status is ``ok`` only if it finished and every result is ``ok`` or ``skipped``. Metric
names carry their unit (``_ms``, ``_mb``, ``_tflops``, ``_s``); errors are relative to the largest
magnitude of the float64 reference (``max|x - ref| / max|ref|``); ``tol`` is the bound a result was held
to. ``summary.md`` shows one table of stages and, per stage, one row per result.

The code: this file is the command line; the stages and what runs them are in ``bench/gpu_check_stages/``
(one module per stage, plus plan, recorder, measure, runner and summary; its ``__init__`` lists them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench.gpu_check_stages.plan import DEFAULT_BUDGET_S, SCHEMA, STAGED_BUDGET_S, STAGES, plan_text
from bench.gpu_check_stages.runner import (
    INSTALL,
    STAGE_FUNCS,
    install_problem,
    install_wheels,
    launch_stage,
    run_plan,
    run_stage,
)
from bench.gpu_check_stages.summary import render_summary

# What tests and other scripts use from here, besides main.
__all__ = ["INSTALL", "SCHEMA", "STAGES", "launch_stage", "main", "plan_text", "render_summary"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the stage JSON files, logs and summary.md (to run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    parser.add_argument("--stages", default=None, help="comma-separated subset of " +
                        ",".join(s.name for s in STAGES))
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"overall limit in seconds (default {DEFAULT_BUDGET_S:.0f}: the staged "
                        f"{STAGED_BUDGET_S:.0f} s, gpu_tests gets the rest)")
    parser.add_argument("--plan", action="store_true",
                        help="print the stages, their seconds and the total; run nothing")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder of peer wheels (inf-cl, siglip-kernel) to install for the run, no index")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.stages.split(",")] if args.stages else [s.name for s in STAGES]
    unknown = [n for n in names if n not in STAGE_FUNCS]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGE_FUNCS)}")
    budget = args.budget_s if args.budget_s is not None else (
        sum(s.quick_budget_s for s in STAGES) if args.quick else DEFAULT_BUDGET_S)
    if args.plan:
        print(plan_text(budget, names))
        return 0
    if not args.out:
        parser.error("--out is required (or --plan)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problem = install_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.stage:
        return run_stage(args.stage, out, args.quick)
    site = install_wheels(args.wheels, out) if args.wheels else None
    return run_plan(names, out, args.quick, budget, site)


if __name__ == "__main__":
    sys.exit(main())
