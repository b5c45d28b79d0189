"""The GPU check's stages in priority order, their time limits, and the sizes of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "llm2clip_fast.gpu_check/1"
STAGED_BUDGET_S = 450.0  # the first seven stages together: 7.5 minutes
DEFAULT_BUDGET_S = 480.0  # the whole run; gpu_tests gets what the others leave of it


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    budget_s: float  # CUDA run; None-like 0 for "what is left"
    quick_budget_s: float


STAGES = [
    Stage("env", "environment: GPU, clocks, versions, llm2clip_fast.info", 10, 60),
    Stage("correctness", "first-call correctness vs float64: both loss paths, adapter, pool, distributed",
          60, 180),
    Stage("loss_compare", "fused losses beside OpenCLIP, one-GEMM plain, Inf-CL, siglip-kernel; per piece",
          120, 240),
    Stage("stage2_step", "a stage-2 training step (bench/stage2_throughput.py)", 90, 120),
    Stage("embed", "frozen-LLM embedding, 16-bit vs 8-bit (bench/embed_throughput.py)", 75, 120),
    Stage("adapter", "the text adapter (bench/adapter_throughput.py)", 45, 120),
    Stage("clip_1m", "CLIP at B=1,048,576: path, finite, peak memory, sampled LSE check", 40, 60),
    Stage("gpu_tests", "pytest -m gpu with a per-test time limit, in the time left", 0, 120),
]
if sum(s.budget_s for s in STAGES) > STAGED_BUDGET_S:
    raise ValueError("the staged plan must fit 7.5 minutes")


def plan_text(budget_s: float, names: list[str] | None = None) -> str:
    """The stages that would run, in order, with their seconds and the total."""
    lines = [f"{'stage':14} {'seconds':>8}  what"]
    staged = 0.0
    for s in STAGES:
        if names is not None and s.name not in names:
            continue
        if s.budget_s:
            staged += s.budget_s
            lines.append(f"{s.name:14} {s.budget_s:8.0f}  {s.title}")
        else:
            lines.append(f"{s.name:14} {max(0.0, budget_s - staged):8.0f}  {s.title} (what is left)")
    lines.append(f"{'total':14} {max(budget_s, staged):8.0f}  (--budget-s {budget_s:.0f}; staged "
                 f"{staged:.0f} s)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the real check on CUDA, tiny ones for --quick on CPU."""

    loss_b: int
    loss_d: int
    adapter_b: int
    adapter_d: int
    adapter_out: int
    pool: tuple[int, int, int]
    compare_b: tuple[int, ...]
    compare_d: int
    error_b: int
    matmul_n: int
    big_b: int
    big_d: int
    reps: int


GPU_SIZES = Sizes(loss_b=8192, loss_d=1024, adapter_b=1024, adapter_d=4096, adapter_out=1280,
                  pool=(64, 256, 4096), compare_b=(65536, 8192), compare_d=1024, error_b=16384, matmul_n=8192,
                  big_b=1 << 20, big_d=1024, reps=5)
QUICK_SIZES = Sizes(loss_b=37, loss_d=24, adapter_b=9, adapter_d=32, adapter_out=16, pool=(3, 7, 24),
                    compare_b=(33,), compare_d=32, error_b=33, matmul_n=64, big_b=67, big_d=16, reps=2)
