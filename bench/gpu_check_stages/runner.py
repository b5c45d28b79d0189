"""Running the stages: the parent installs the peers' wheels, runs each stage in a fresh process under
its limit, merges its status and rewrites summary.md; the child (``--stage NAME``) runs one stage."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_check_stages.clip_1m import stage_clip_1m
from bench.gpu_check_stages.correctness import stage_correctness
from bench.gpu_check_stages.delegated import DELEGATED, run_delegated_stage
from bench.gpu_check_stages.env import stage_env
from bench.gpu_check_stages.gpu_tests import stage_gpu_tests
from bench.gpu_check_stages.loss_compare import stage_loss_compare
from bench.gpu_check_stages.plan import GPU_SIZES, QUICK_SIZES, REPO_ROOT, SCHEMA, STAGES, Sizes, Stage
from bench.gpu_check_stages.recorder import Recorder
from bench.gpu_check_stages.summary import fmt, render_summary, write_summary

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"  # what a stage process runs, with --stage NAME
INSTALL = "pip install --no-build-isolation --no-deps -e ."
PEER_SITE = "peer_site"

STAGE_FUNCS: dict[str, Callable[[Recorder, Any, Sizes, bool], None]] = {
    "env": stage_env,
    "correctness": stage_correctness,
    "loss_compare": stage_loss_compare,
    **{name: (lambda rec, dev, sizes, quick, module=module: run_delegated_stage(rec, dev, module, quick))
       for name, module in DELEGATED.items()},
    "clip_1m": stage_clip_1m,
    "gpu_tests": stage_gpu_tests,
}


def run_stage(name: str, out: Path, quick: bool) -> int:
    """Child-process entry: run one stage, writing its JSON as results arrive."""
    if quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    stage = next(s for s in STAGES if s.name == name)
    dev = torch.device("cpu" if quick else "cuda:0")  # an explicit index: set_device and NCCL need one
    rec = Recorder(out, stage, quick, dev.type)
    if dev.type == "cuda" and not torch.cuda.is_available():
        rec.add("cuda", "error", note="torch sees no CUDA device; use --quick for the CPU smoke run")
        return 1
    torch.manual_seed(0)
    STAGE_FUNCS[name](rec, dev, QUICK_SIZES if quick else GPU_SIZES, quick)
    return 0


def install_wheels(wheels: Path, out: Path) -> Path:
    """Install every wheel in ``wheels`` (no index, no dependencies) into ``out/peer_site``."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise FileNotFoundError(f"--wheels {wheels}: no .whl files there (pip download --no-deps "
                                "inf-cl==1.2.1 siglip-kernel==0.1.2 -d {wheels})")
    site = out / PEER_SITE
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, files)]
    subprocess.run(cmd, check=True)
    return site


def _child_env(quick: bool, site: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(site) if site else None, env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    if quick:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _final_status(doc: dict[str, Any], returncode: int | None, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    states = [r["status"] for r in doc.get("results", [])]
    if returncode != 0 or "error" in states:
        return "error"
    if "fail" in states:
        return "fail"
    return "ok"


def _run_stage_process(stage: Stage, out: Path, quick: bool, timeout_s: float,
                       site: Path | None) -> tuple[int | None, bool]:
    """The stage in its own process group, output to ``out/<stage>.log``: (return code, timed out)."""
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--stage", stage.name]
    if quick:
        cmd.append("--quick")
    with open(out / f"{stage.name}.log", "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(quick, site),
                                cwd=REPO_ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the stage and anything it started (pytest, compile workers)
            proc.wait()
            return None, True


def launch_stage(stage: Stage, out: Path, quick: bool, timeout_s: float,
                 site: Path | None = None) -> dict[str, Any]:
    """Run one stage in a fresh process under ``timeout_s`` (``site``: the peers' wheels, on its path);
    returns its merged JSON document."""
    from bench._common import write_json

    path = out / f"{stage.name}.json"
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc, timed_out = _run_stage_process(stage, out, quick, timeout_s, site)
    elapsed = time.perf_counter() - t0
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        doc = {"schema": SCHEMA, "stage": stage.name, "title": stage.title, "quick": quick,
               "device": "cpu" if quick else "cuda", "notes": [], "results": []}
    doc.update(timeout_s=timeout_s, elapsed_s=elapsed, returncode=rc)
    doc["status"] = _final_status(doc, rc, timed_out)
    if doc["status"] in ("error", "timeout"):
        log = out / f"{stage.name}.log"
        doc["error"] = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])[-3000:]
    write_json(path, doc)
    return doc


def skipped_doc(stage: Stage, quick: bool, why: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "stage": stage.name, "title": stage.title, "status": "skipped", "quick": quick,
            "device": "cpu" if quick else "cuda", "timeout_s": 0.0, "elapsed_s": 0.0, "returncode": None,
            "notes": [why], "error": None, "results": []}


def install_problem() -> str | None:
    """One line saying what to do when the package (with its kernels) is not importable, else None."""
    try:
        importlib.import_module("llm2clip_fast")
        if importlib.util.find_spec("llm2clip_fast.kernels") is None:
            raise ImportError("llm2clip_fast.kernels is missing (llm2clip_kernels/ is mapped at install)")
    except ImportError as exc:
        return (f"llm2clip_fast is not installed ({exc}): run `{INSTALL}` in {REPO_ROOT}, "
                "then rerun this check")
    return None


def run_plan(names: list[str], out: Path, quick: bool, budget: float, site: Path | None) -> int:
    """Parent: each named stage in order under what is left of ``budget``; summary.md after each.
    0 when every stage is ok or skipped, else 1."""
    t_start = time.perf_counter()
    docs: list[dict[str, Any]] = []
    for stage in [s for s in STAGES if s.name in names]:
        left = budget - (time.perf_counter() - t_start)
        limit = (stage.quick_budget_s if quick else stage.budget_s) or left
        if left <= 5:
            doc = skipped_doc(stage, quick, f"overall budget of {budget:.0f} s spent")
            from bench._common import write_json

            write_json(out / f"{stage.name}.json", doc)
        else:
            print(f"== {stage.name} (limit {min(limit, left):.0f} s): {stage.title}", flush=True)
            doc = launch_stage(stage, out, quick, min(limit, left), site)
        docs.append(doc)
        write_summary(out, docs, quick)
        print(f"   {stage.name}: {doc['status']} in {fmt(doc.get('elapsed_s'))} s", flush=True)
    path = write_summary(out, docs, quick)
    print(render_summary(docs, quick))
    print(f"wrote {path}")
    return 0 if all(d["status"] in ("ok", "skipped") for d in docs) else 1
