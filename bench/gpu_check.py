"""One-shot GPU check: is every GPU path right, and how fast is it (under 8.5 minutes on one H200).

    pip install --no-build-isolation --no-deps -e .      # on a fresh box: builds _C and _cuda
    python bench/gpu_check.py --out gpu_check_out        # the check (CUDA)
    python bench/gpu_check.py --out /tmp/gc --quick      # the same code, tiny sizes, CPU + Triton interpreter

Each stage runs in its own process under a wall-clock limit, cheapest first; a stage's results are
written as they come (one JSON file per stage, rewritten after every measurement) and ``summary.md``
is regenerated after every stage, so a run cut short still reports everything it measured.

Stages (timeouts in seconds, CUDA run; the optional ones run only if the overall budget still allows):

==============  =====  ====================================================================================
env             20     GPU name, clocks, versions, ``python -m llm2clip_fast.info``
correctness     85     first calls in a fresh process (autotune defects show there), forced Triton: CLIP and
                       SigLIP at B=8192, D=1024 in bf16 and fp16, adapter 4096->1280, masked mean pool
                       (triton and cuda); loss and every gradient against float64 on the same inputs, and
                       the distributed losses' single-rank path against the plain ones
gpu_tests       110    ``pytest -m gpu`` on the test files that carry the marker, per-test time limit
loss_speed      35     bf16 matmul rate (8192^3); fused CLIP and SigLIP fwd+bwd at B=65536, D=1024 bf16
                       (CUDA events, median of 5, fwd/bwd/total, TFLOP/s with 8*B^2*D and as a fraction of
                       the measured matmul rate) against the materialised OpenCLIP-style losses
clip_1m         60     CLIP at B=1,048,576, D=1024 bf16: finite loss and gradients, peak memory, time; row
                       and column log-sum-exp recomputed with torch for sampled rows (first, random, last)
adapter_speed   85     adapter 4096->1280 (4 blocks x2, bf16 autocast) lean (cuBLAS + Triton) vs eager vs
                       recompute vs torch.compile at batch 8192 and 32768: fwd+bwd time, saved bytes,
                       activation memory, fidelity (bench/adapter_throughput.py's gpu_speed_cases)
adapter_kernels 30     optional: each Triton element-wise kernel of the lean adapter (LayerNorm forward and
                       backward, GELU + dropout forward and backward) against the torch ops that compute
                       the same thing, at one block's shapes (B=8192, 4096 -> 8192)
models          70     optional: caption-embedding throughput of an 8B-shaped random Llama built on the GPU,
                       bf16 against w8a8-fp8, w8a8-int8, llm-int8 and torchao where installed
                       (bench/embed_throughput.py's gpu_cases), and a stage-2 step on ViT-L/14 with cached
                       (random) embeddings at batch 1024. Random weights from configs; nothing is downloaded.
==============  =====  ====================================================================================

``--quick`` runs every stage with tiny sizes on CPU with ``TRITON_INTERPRET=1`` (the same code, so
the check cannot rot; ``tests/test_bench_quick.py`` runs it). ``--stages a,b`` runs a subset.

Stage file schema (``DIR/<stage>.json``, schema id ``llm2clip_fast.gpu_check/1``)::

    {
      "schema": "llm2clip_fast.gpu_check/1",
      "stage": "correctness",            # stage name (table above)
      "title": "...",                    # one line saying what the stage does
      "status": "ok",                    # ok | fail (a check failed) | error (the stage crashed) |
                                         # timeout (killed at timeout_s) | skipped | running
      "quick": false,
      "device": "cuda",                  # cuda | cpu
      "timeout_s": 90.0,
      "elapsed_s": 41.2,                 # wall time of the stage process (null while running)
      "returncode": 0,                   # of the stage process (null if killed or not started)
      "notes": ["..."],                  # free-text remarks (e.g. a part skipped and why)
      "error": null,                     # last lines of the stage's stderr when status is error/timeout
      "results": [                       # one entry per measurement or check, in the order made
        {"name": "clip bf16 B=8192 D=1024",
         "status": "ok",                 # ok | fail | error | skipped
         "metrics": {"loss_rel_err": 1e-4, "backend": "triton", ...},   # flat: str | int | float | bool
         "note": ""}
      ]
    }

A stage's status is ``ok`` only if it finished and every result is ``ok`` or ``skipped``. Metric
names carry their unit (``_ms``, ``_mb``, ``_tflops``, ``_s``); errors are relative to the largest
magnitude of the float64 reference (``max|x - ref| / max|ref|``); ``tol`` is the bound a result was held
to. ``summary.md`` shows one table of stages and, per stage, one row per result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

SCHEMA = "llm2clip_fast.gpu_check/1"
INSTALL = "pip install --no-build-isolation --no-deps -e ."
TOTAL_BUDGET_S = 495.0  # the sum of the stage timeouts below: the whole run stays under 8.5 minutes


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    timeout_s: float
    quick_timeout_s: float
    optional: bool = False


STAGES = [
    Stage("env", "environment: GPU, clocks, versions, llm2clip_fast.info", 20, 60),
    Stage("correctness", "first-call correctness vs float64: losses, adapter, pool, distributed", 85, 120),
    Stage("gpu_tests", "pytest -m gpu with a per-test time limit", 110, 120),
    Stage("loss_speed", "matmul rate; fused vs materialised CLIP/SigLIP fwd+bwd", 35, 90),
    Stage("clip_1m", "CLIP at B=1,048,576: finite, peak memory, sampled LSE check", 60, 60),
    Stage("adapter_speed", "adapter lean vs eager vs torch.compile: time, saved bytes, fidelity", 85, 120),
    Stage("adapter_kernels", "each lean-adapter Triton kernel vs the torch ops it replaces", 30, 90,
          optional=True),
    Stage("models", "8B-shaped Llama embedding throughput; ViT-L/14 stage-2 step", 70, 120, optional=True),
]


# ------------------------------------------------------------------------------------------------
# shared by stage processes


class Recorder:
    """Collects a stage's results and rewrites its JSON file after each one (atomic writes)."""

    def __init__(self, out: Path, stage: Stage, quick: bool, device: str) -> None:
        self.path = out / f"{stage.name}.json"
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "stage": stage.name, "title": stage.title, "status": "running",
            "quick": quick, "device": device,
            "timeout_s": stage.quick_timeout_s if quick else stage.timeout_s,
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

    def attempt(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run ``fn`` (returns metrics, may hold ``status`` and ``note``); an exception is an error row."""
        try:
            metrics = dict(fn())
        except Exception as exc:
            self.add(name, "error", note=f"{type(exc).__name__}: {exc}"[-600:])
            traceback.print_exc()
            return
        status = metrics.pop("status", "ok")
        note = metrics.pop("note", "")
        self.add(name, status, note, **metrics)


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


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the real check on CUDA, tiny ones for --quick on CPU."""

    loss_b: int
    loss_d: int
    adapter_b: int
    adapter_d: int
    adapter_out: int
    pool: tuple[int, int, int]
    speed_b: int
    matmul_n: int
    big_b: int
    big_d: int
    vit_preset: str
    vit_batch: int
    stage2_llm_dim: int
    stage2_embed_dim: int
    reps: int


GPU_SIZES = Sizes(loss_b=8192, loss_d=1024, adapter_b=1024, adapter_d=4096, adapter_out=1280,
                  pool=(64, 256, 4096), speed_b=65536, matmul_n=8192, big_b=1 << 20, big_d=1024,
                  vit_preset="vit-l-14", vit_batch=1024, stage2_llm_dim=4096,
                  stage2_embed_dim=1280, reps=5)
QUICK_SIZES = Sizes(loss_b=37, loss_d=24, adapter_b=9, adapter_d=32, adapter_out=16, pool=(3, 7, 24),
                    speed_b=33, matmul_n=64, big_b=67, big_d=16, vit_preset="micro", vit_batch=8,
                    stage2_llm_dim=32, stage2_embed_dim=16, reps=2)


def rel_err(x: Any, ref: Any) -> float:
    """``max|x - ref| / max|ref|`` in float64 (``max|x - ref|`` when the reference is all zero)."""
    import torch

    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    diff = (x - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


class Timer:
    """Median wall times of a callable: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def split(self, parts: list[Callable[[], Any]], reps: int) -> list[float]:
        """Run ``parts`` in order ``reps`` times (after one untimed round); median ms of each part."""
        import torch

        for p in parts:
            p()
        times: list[list[float]] = [[] for _ in parts]
        cuda = self.device.type == "cuda"
        for _ in range(reps):
            if cuda:
                events = [torch.cuda.Event(enable_timing=True) for _ in range(len(parts) + 1)]
                events[0].record()
                for i, p in enumerate(parts):
                    p()
                    events[i + 1].record()
                torch.cuda.synchronize()
                for i in range(len(parts)):
                    times[i].append(events[i].elapsed_time(events[i + 1]))
            else:
                for i, p in enumerate(parts):
                    t0 = time.perf_counter()
                    p()
                    times[i].append((time.perf_counter() - t0) * 1000)
        return [statistics.median(t) for t in times]


def _peak_mb(fn: Callable[[], Any], device: Any) -> float | None:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    from bench._common import cuda_peak_mb

    peak, before = cuda_peak_mb(fn, device)
    return peak - before


# ------------------------------------------------------------------------------------------------
# stage: env


def stage_env(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    import torch

    def versions() -> dict[str, Any]:
        m: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "torch_cuda": torch.version.cuda or "none"}
        for name in ("triton", "transformers", "peft", "bitsandbytes", "webdataset"):
            spec = importlib.util.find_spec(name)
            m[name] = importlib.import_module(name).__version__ if spec else "not installed"
        import llm2clip_fast

        m["llm2clip_fast"] = getattr(llm2clip_fast, "__version__", "?")
        m["llm2clip_fast_path"] = str(Path(llm2clip_fast.__file__).parent)
        return m

    rec.attempt("versions", versions)

    def gpu() -> dict[str, Any]:
        if dev.type != "cuda":
            return {"status": "skipped", "note": "no CUDA device (quick run on CPU)",
                    "cpu_count": os.cpu_count()}
        p = torch.cuda.get_device_properties(dev)
        m = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": p.total_memory / 2**30,
             "sms": p.multi_processor_count, "device_count": torch.cuda.device_count()}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            m["nvidia_smi"] = q.stdout.strip().splitlines()[0] if q.stdout.strip() else q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            m["nvidia_smi"] = f"unavailable: {exc}"
        return m

    rec.attempt("gpu", gpu)

    def info() -> dict[str, Any]:
        import io

        from llm2clip_fast import info as info_cli

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):  # this stage is its own process already
            rc = info_cli.main([])
        (rec.path.parent / "info.txt").write_text(buf.getvalue())
        return {"status": "ok" if rc == 0 else "fail", "returncode": rc,
                "lines": len(buf.getvalue().splitlines()), "note": "full output in info.txt"}

    rec.attempt("llm2clip_fast.info", info)


# ------------------------------------------------------------------------------------------------
# stage: correctness


def _clip64(img: Any, txt: Any, scale: Any) -> Any:
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _siglip64(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def _loss_check(kind: str, dtype_name: str, dev: Any, b: int, d: int, distributed: bool = False) -> dict:
    """Fused loss and its gradients vs float64 on the same (low-precision) inputs.

    Tolerance (DESIGN.md): the fused error may be at most twice that of the same formula computed
    with plain torch in the input's precision, plus 1e-4 for the cases where that error is ~0.
    """
    import torch
    import torch.nn.functional as F

    from llm2clip_fast.ops import _backend
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(1)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype)
    txt = (0.6 * txt + 0.4 * img).to(dtype)  # positives stand out, as in training
    scale_v, bias_v = (1 / 0.07, None) if kind == "clip" else (10.0, -10.0)
    backend = "triton"  # forced everywhere: a backend that cannot serve raises instead of falling back

    def run(fn: Callable[..., Any], cast: Any) -> tuple[Any, list[Any]]:
        leaves = [img.to(cast).requires_grad_(), txt.to(cast).requires_grad_(),
                  torch.tensor(scale_v, device=dev, dtype=torch.float32 if cast != torch.float64 else cast,
                               requires_grad=True)]
        if bias_v is not None:
            leaves.append(torch.tensor(bias_v, device=dev, dtype=leaves[2].dtype, requires_grad=True))
        loss = fn(*leaves)
        return loss.detach(), list(torch.autograd.grad(loss, leaves))

    _backend.clear_selections()
    if kind == "clip":
        fused = lambda i, t, s: clip_loss(i, t, s, backend=backend, distributed=distributed)
        ref = _clip64
    else:
        fused = lambda i, t, s, c: siglip_loss(i, t, s, c, backend=backend, distributed=distributed)
        ref = _siglip64
    loss, grads = run(fused, dtype)
    chosen = _backend.last_selected(f"{kind}_loss")
    loss64, grads64 = run(ref, torch.float64)
    lossp, gradsp = run(ref, dtype)
    names = ["loss", "d_image", "d_text", "d_scale"] + (["d_bias"] if bias_v is not None else [])
    m: dict[str, Any] = {"backend": chosen}
    ok = bool(torch.isfinite(loss).item())
    for name, x, r, p in zip(names, [loss, *grads], [loss64, *grads64], [lossp, *gradsp]):
        err, err_p = rel_err(x, r), rel_err(p, r)
        tol = 2 * err_p + 1e-4
        m[f"{name}_err"] = err
        m[f"{name}_torch_{dtype_name}_err"] = err_p
        ok = ok and err <= tol
    m["loss"] = loss.item()
    m["status"] = "ok" if ok else "fail"
    m["note"] = "tol per value: 2 x plain-torch error in the same precision + 1e-4"
    return m


def _adapter_check(dev: Any, sizes: Sizes) -> dict:
    import torch

    from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference
    from llm2clip_fast.ops import _backend

    torch.manual_seed(2)
    d, n, b = sizes.adapter_d, sizes.adapter_out, sizes.adapter_b
    fused = TextAdapter(d, n, backend="triton").to(dev)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so their gradients mean something
        for p in fused.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ref = TextAdapterReference(d, n).to(dev)
    ref.load_state_dict(fused.state_dict())
    ref64 = TextAdapterReference(d, n).to(dev, torch.float64)
    ref64.load_state_dict(fused.state_dict())
    x = torch.randn(b, d, device=dev)
    gy = torch.randn(b, n, device=dev)
    low = dev.type == "cuda"  # bf16 autocast as in training; on CPU the interpreter runs fp32
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if low else contextlib.nullcontext

    def run(model: Any, cast: Any, autocast: bool) -> tuple[Any, list[Any]]:
        xi = x.to(cast).requires_grad_()
        with amp() if autocast else contextlib.nullcontext():
            y = model(xi)
        params = list(model.parameters())
        grads = torch.autograd.grad(y, [xi, *params], gy.to(y.dtype))
        return y.detach(), list(grads)

    _backend.clear_selections()
    y, g = run(fused, torch.float32, True)
    chosen = _backend.last_selected("text_adapter")
    y64, g64 = run(ref64, torch.float64, False)
    yp, gp = run(ref, torch.float32, True)
    m: dict[str, Any] = {"backend": chosen, "autocast": "bf16" if low else "none (fp32)"}
    names = ["out", "d_x"] + [f"d_{k}" for k, _ in fused.named_parameters()]
    worst, ok = 0.0, True
    for name, a, r, p in zip(names, [y, *g], [y64, *g64], [yp, *gp]):
        err, err_p = rel_err(a, r), rel_err(p, r)
        ok = ok and err <= 2 * err_p + 1e-4
        if name in ("out", "d_x"):
            m[f"{name}_err"], m[f"{name}_torch_err"] = err, err_p
        elif err / (err_p + 1e-4) > worst:
            worst = err / (err_p + 1e-4)
            m["worst_param"], m["worst_param_err"], m["worst_param_torch_err"] = name, err, err_p
    m["status"] = "ok" if ok else "fail"
    return m


def _pool_check(dev: Any, sizes: Sizes, backend: str) -> dict:
    import torch

    from llm2clip_fast.ops import _backend
    from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool

    b, seq, h = sizes.pool
    g = torch.Generator(device="cpu").manual_seed(3)
    hidden = torch.randn(b, seq, h, generator=g).to(dev, torch.bfloat16)
    lengths = torch.randint(1, seq + 1, (b,), generator=g)
    lengths[-1] = seq  # one full row: the last block of the sequence is read
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(dev)
    gy = torch.randn(b, h, generator=g).to(dev)
    hx = hidden.clone().requires_grad_()
    _backend.clear_selections()
    try:
        out = masked_mean_pool(hx, mask, backend=backend)
    except _backend.BackendUnavailableError as exc:
        return {"status": "skipped", "note": str(exc)[-300:]}
    (dh,) = torch.autograd.grad(out, hx, gy)
    h64 = hidden.to(torch.float64).requires_grad_()
    m64 = mask.to(torch.float64)
    ref = (h64 * m64[..., None]).sum(1) / m64.sum(1, keepdim=True)
    (dh64,) = torch.autograd.grad(ref, h64, gy.to(torch.float64))
    e_out, e_grad = rel_err(out, ref), rel_err(dh, dh64)
    ok = e_out <= 1e-5 and e_grad <= 1e-2  # fp32 accumulation; the bf16 gradient rounds to 2^-8
    return {"backend": _backend.last_selected("masked_mean_pool"), "out_err": e_out, "d_hidden_err": e_grad,
            "status": "ok" if ok else "fail", "note": "tol: out 1e-5 (fp32 sums), d_hidden 1e-2 (bf16)"}


def _distributed_single_rank(rec: Recorder, dev: Any, sizes: Sizes) -> None:
    import tempfile

    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        import torch

        torch.cuda.set_device(dev)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            for kind in ("clip", "siglip"):
                rec.attempt(f"{kind} distributed=True, world 1, bf16",
                            lambda kind=kind: _loss_check(kind, "bf16", dev, sizes.loss_b, sizes.loss_d,
                                                          distributed=True))
        finally:
            dist.destroy_process_group()


def stage_correctness(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    b, d = sizes.loss_b, sizes.loss_d
    for kind in ("clip", "siglip"):
        for dtype in ("bf16", "fp16"):
            rec.attempt(f"{kind} {dtype} B={b} D={d} (forced triton)",
                        lambda kind=kind, dtype=dtype: _loss_check(kind, dtype, dev, b, d))
    rec.attempt(f"adapter {sizes.adapter_d}->{sizes.adapter_out} B={sizes.adapter_b} (forced triton)",
                lambda: _adapter_check(dev, sizes))
    for backend in ("triton", "cuda"):
        rec.attempt(f"masked_mean_pool {sizes.pool} bf16 (forced {backend})",
                    lambda backend=backend: _pool_check(dev, sizes, backend))
    try:
        _distributed_single_rank(rec, dev, sizes)
    except Exception as exc:
        rec.add("distributed single rank", "error", note=f"{type(exc).__name__}: {exc}"[-600:])


# ------------------------------------------------------------------------------------------------
# stage: gpu_tests


_PER_TEST_TIMEOUT_S = 30.0


def gpu_test_files() -> list[str]:
    """Test files that carry the ``gpu`` marker (collecting only them keeps the stage short)."""
    files = []
    for path in sorted((REPO_ROOT / "tests").glob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" in text:
            files.append(str(path.relative_to(REPO_ROOT)))
    return files


class _LiveTestResults:
    """pytest plugin: one result row per test as it finishes, so a stage killed at its limit still
    shows every test that ran (the first H200 run lost all of them to an end-of-run junit report)."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        print(f"\nstart {nodeid}", flush=True)  # the stage log then names a test that hangs

    def pytest_runtest_logreport(self, report: Any) -> None:
        # One row per test: its call phase, or the setup/teardown phase that skipped or failed it.
        if report.when == "call" or (report.when != "call" and (report.skipped or report.failed)):
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.rec.add(report.nodeid, "skipped", str(reason)[:200], time_s=report.duration)
            elif report.failed:
                self.rec.add(report.nodeid, "fail", str(report.longreprtext)[-400:], time_s=report.duration,
                             phase=report.when)
            else:
                self.rec.add(report.nodeid, "ok", time_s=report.duration)


def stage_gpu_tests(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    files = gpu_test_files()
    if not files:
        rec.add("pytest -m gpu", "skipped", note="no test file carries the gpu marker")
        return
    # The per-test limit comes from bench/_pytest_time_limit.py (SIGALRM in the test's thread): a
    # test stuck in Python fails with TimeoutError; one stuck inside a kernel is caught by the
    # stage's own time limit.
    import pytest

    os.environ["LLM2CLIP_TEST_TIME_LIMIT_S"] = str(_PER_TEST_TIMEOUT_S)
    args = ["-q", "-m", "gpu", "-p", "bench._pytest_time_limit", "-p", "no:cacheprovider",
            "-o", "addopts=", *files]
    rec.note(f"per-test limit {_PER_TEST_TIMEOUT_S:.0f} s; files: {', '.join(files)}")
    os.chdir(REPO_ROOT)
    # In this process (already the stage's own): its output goes to the stage log.
    returncode = int(pytest.main(args, plugins=[_LiveTestResults(rec)]))
    # pytest: 0 all passed, 5 nothing collected (every gpu test deselected); anything else failed.
    rec.add("pytest exit", "ok" if returncode in (0, 5) else "fail", returncode=returncode)


# ------------------------------------------------------------------------------------------------
# stage: loss_speed


def _matmul_rate(dev: Any, n: int, reps: int) -> dict:
    import torch

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    (ms,) = Timer(dev).split([lambda: torch.mm(a, b)], reps=max(reps, 5) * 4)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def _loss_speed(kind: str, impl: str, dev: Any, b: int, d: int, reps: int, matmul_tflops: float) -> dict:
    import torch
    import torch.nn.functional as F

    from bench.loss_throughput import openclip_clip_loss, openclip_siglip_loss
    from llm2clip_fast.ops import _backend
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    img = F.normalize(torch.randn(b, d, device=dev), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=dev), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07 if kind == "clip" else 10.0, device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    backend = "triton"
    if kind == "clip":
        fn = (lambda: clip_loss(img, txt, scale, backend=backend)) if impl == "fused" else (
            lambda: openclip_clip_loss(img, txt, scale))
    else:
        fn = (lambda: siglip_loss(img, txt, scale, bias, backend=backend)) if impl == "fused" else (
            lambda: openclip_siglip_loss(img, txt, scale, bias))
    state: dict[str, Any] = {}

    def fwd() -> None:
        img.grad = txt.grad = scale.grad = bias.grad = None
        state["loss"] = fn()

    def bwd() -> None:
        state.pop("loss").backward()

    _backend.clear_selections()
    fwd_ms, bwd_ms = Timer(dev).split([fwd, bwd], reps=reps)
    peak = _peak_mb(lambda: (fwd(), bwd()), dev)
    flops = (8.0 if impl == "fused" else 6.0) * b * b * d
    total = fwd_ms + bwd_ms
    tf = flops / total / 1e9
    return {"backend": _backend.last_selected(f"{kind}_loss") if impl == "fused" else "torch (materialised)",
            "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": total, "tflops": tf,
            "frac_of_matmul": tf / matmul_tflops if matmul_tflops else None, "peak_mb": peak,
            "flops_counted": "8*B^2*D" if impl == "fused" else "6*B^2*D"}


def stage_loss_speed(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    mm = _matmul_rate(dev, sizes.matmul_n, sizes.reps)
    rec.add(f"matmul {mm['dtype']} {sizes.matmul_n}^3", "ok", **mm)
    b, d = sizes.speed_b, sizes.loss_d
    results: dict[tuple[str, str], dict] = {}
    for kind in ("clip", "siglip"):
        for impl in ("fused", "materialised"):
            def run(kind: str = kind, impl: str = impl) -> dict:
                r = _loss_speed(kind, impl, dev, b, d, sizes.reps, mm["tflops"])
                results[(kind, impl)] = r
                other = results.get((kind, "fused"))
                if impl == "materialised" and other:
                    r["fused_speedup"] = r["total_ms"] / other["total_ms"]
                return r

            rec.attempt(f"{kind} {impl} fwd+bwd B={b} D={d}", run)


# ------------------------------------------------------------------------------------------------
# stage: clip_1m


def stage_clip_1m(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    from llm2clip_fast.ops import _backend
    from llm2clip_fast.ops.clip_loss import clip_loss, clip_lse_forward

    b, d = sizes.big_b, sizes.big_d
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    img = F.normalize(torch.randn(b, d, device=dev, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=dev, dtype=dtype), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
    inputs_mb = 2 * img.numel() * img.element_size() / 2**20
    state: dict[str, Any] = {}

    def step() -> None:
        loss = clip_loss(img, txt, scale, backend="triton")
        loss.backward()
        state["loss"] = loss.detach()

    def run_step() -> dict:
        _backend.clear_selections()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        peak = _peak_mb(step, dev)
        secs = time.perf_counter() - t0
        finite = all(bool(torch.isfinite(t).all()) for t in (state["loss"], img.grad, txt.grad, scale.grad))
        tf = 8.0 * b * b * d / secs / 1e12
        return {"status": "ok" if finite else "fail", "backend": _backend.last_selected("clip_loss"),
                "loss": state["loss"].item(), "finite": finite, "step_s": secs, "tflops": tf,
                "peak_above_inputs_mb": peak, "inputs_mb": inputs_mb,
                "note": "first call: includes autotuning/compilation"}

    rec.attempt(f"clip fwd+bwd B={b} D={d}", run_step)
    img.grad = txt.grad = scale.grad = None

    def lse_sample() -> dict:
        with torch.no_grad():
            row_lse, col_lse = clip_lse_forward(img, txt, scale.detach(), backend="triton")
            g = torch.Generator(device="cpu").manual_seed(4)
            picks = torch.randint(0, b, (8,), generator=g).tolist()
            idx = torch.tensor(sorted(set([0, 1, *picks, b - 2, b - 1])), device=dev)
            s = scale.detach().float()
            rows = torch.logsumexp(s * img[idx].float() @ txt.float().T, dim=1)
            cols = torch.logsumexp(s * txt[idx].float() @ img.float().T, dim=1)
            e_row = (rows - row_lse[idx].float()).abs().max().item()
            e_col = (cols - col_lse[idx].float()).abs().max().item()
        ok = e_row <= 1e-3 and e_col <= 1e-3
        return {"status": "ok" if ok else "fail", "rows_checked": idx.numel(), "row_lse_abs_err": e_row,
                "col_lse_abs_err": e_col,
                "note": "indices 0, 1, 8 random, B-2, B-1; fp32 torch recompute, tol 1e-3"}

    rec.attempt("row/column log-sum-exp vs torch (sampled rows)", lse_sample)


# ------------------------------------------------------------------------------------------------
# stage: adapter_speed


def stage_adapter_speed(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    """bench/adapter_throughput.py's GPU plan: every adapter backend's time, saved bytes and fidelity."""
    from bench.adapter_throughput import gpu_speed_cases

    if quick:
        rec.note("quick: torch.compile is not measured (CPU code generation takes minutes on 2 cores)")
    for name, run in gpu_speed_cases(dev, quick):
        rec.attempt(name, run)


def stage_adapter_kernels(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    """Each Triton element-wise kernel of the lean adapter against the torch ops that compute the same."""
    from bench.adapter_throughput import gpu_kernel_cases

    for name, run in gpu_kernel_cases(dev, quick):
        rec.attempt(name, run)


# ------------------------------------------------------------------------------------------------
# stage: models


def stage_models(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    """bench/embed_throughput.py's GPU plan (an 8B-shaped Llama, bf16 against the 8-bit modes), then a
    stage-2 training step."""
    from bench.embed_throughput import gpu_cases, gpu_skipped

    for name, why in gpu_skipped(dev, quick):
        rec.add(name, "skipped", note=why)
    for name, run in gpu_cases(dev, quick):
        rec.attempt(name, run)

    def stage2() -> dict:
        from bench.stage2_throughput import point

        r = point(impl="fused", preset=sizes.vit_preset, batch=sizes.vit_batch, llm_dim=sizes.stage2_llm_dim,
                  embed_dim=sizes.stage2_embed_dim, device=str(dev),
                  precision="bf16" if dev.type == "cuda" else "fp32", micro_batch=sizes.vit_batch,
                  grad_checkpointing=dev.type == "cuda", budget_s=0.3 if quick else 1.0)
        r.pop("peak_above_baseline_mb", None)
        r["note"] = "fused adapter + fused CLIP loss + AdamW; cached (random) LLM embeddings"
        return r

    rec.attempt(f"stage-2 step {sizes.vit_preset} B={sizes.vit_batch}", stage2)


STAGE_FUNCS: dict[str, Callable[[Recorder, Any, Sizes, bool], None]] = {
    "env": stage_env, "correctness": stage_correctness, "gpu_tests": stage_gpu_tests,
    "loss_speed": stage_loss_speed, "clip_1m": stage_clip_1m, "adapter_speed": stage_adapter_speed,
    "adapter_kernels": stage_adapter_kernels, "models": stage_models,
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


# ------------------------------------------------------------------------------------------------
# parent: runs stages, merges status, writes summary.md


def _child_env(quick: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
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


def launch_stage(stage: Stage, out: Path, quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run one stage in a fresh process under ``timeout_s``; returns its merged JSON document."""
    from bench._common import write_json

    path = out / f"{stage.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--stage", stage.name]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    log = out / f"{stage.name}.log"
    timed_out, rc = False, None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(quick), cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # the stage and anything it started (pytest, compile workers)
            proc.wait()
    elapsed = time.perf_counter() - t0
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        doc = {"schema": SCHEMA, "stage": stage.name, "title": stage.title, "quick": quick,
               "device": "cpu" if quick else "cuda", "notes": [], "results": []}
    doc.update(timeout_s=timeout_s, elapsed_s=elapsed, returncode=rc)
    doc["status"] = _final_status(doc, rc, timed_out)
    if doc["status"] in ("error", "timeout"):
        doc["error"] = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])[-3000:]
    write_json(path, doc)
    return doc


def skipped_doc(stage: Stage, quick: bool, why: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "stage": stage.name, "title": stage.title, "status": "skipped", "quick": quick,
            "device": "cpu" if quick else "cuda", "timeout_s": 0.0, "elapsed_s": 0.0, "returncode": None,
            "notes": [why], "error": None, "results": []}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def render_summary(docs: list[dict[str, Any]], quick: bool) -> str:
    head = " (--quick: tiny sizes on CPU, Triton interpreter)" if quick else ""
    lines = ["# llm2clip_fast GPU check" + head,
             "", "| stage | status | time (s) | limit (s) | results ok/all | what |",
             "| --- | --- | --- | --- | --- | --- |"]
    for doc in docs:
        res = doc.get("results", [])
        good = sum(r["status"] in ("ok", "skipped") for r in res)
        el = doc.get("elapsed_s")
        lines.append(f"| {doc['stage']} | **{doc['status']}** | {_fmt(el) if el is not None else '-'} | "
                     f"{_fmt(doc.get('timeout_s'))} | {good}/{len(res)} | {doc.get('title', '')} |")
    for doc in docs:
        lines += ["", f"## {doc['stage']}: {doc['status']}", ""]
        lines += [f"- {n}" for n in doc.get("notes", [])]
        if doc.get("results"):
            lines += ["| result | status | metrics | note |", "| --- | --- | --- | --- |"]
            for r in doc["results"]:
                metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in r.get("metrics", {}).items())
                note = str(r.get("note", "")).replace("|", "/").replace("\n", " ")
                lines.append(f"| {r['name']} | {r['status']} | {metrics} | {note} |")
        if doc.get("error"):
            lines += ["", "```", doc["error"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, docs: list[dict[str, Any]], quick: bool) -> Path:
    path = out / "summary.md"
    tmp = out / ".summary.md.tmp"
    tmp.write_text(render_summary(docs, quick))
    os.replace(tmp, path)
    return path


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the stage JSON files, logs and summary.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    parser.add_argument("--stages", default=None, help="comma-separated subset of " +
                        ",".join(s.name for s in STAGES))
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--budget-s", type=float, default=None,
                        help="overall limit; optional stages run only if they fit "
                        f"(default {TOTAL_BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problem = install_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.stage:
        return run_stage(args.stage, out, args.quick)
    names = [s.strip() for s in args.stages.split(",")] if args.stages else [s.name for s in STAGES]
    unknown = [n for n in names if n not in STAGE_FUNCS]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGE_FUNCS)}")
    budget = args.budget_s if args.budget_s is not None else (
        sum(s.quick_timeout_s for s in STAGES) if args.quick else TOTAL_BUDGET_S)
    t_start = time.perf_counter()
    docs: list[dict[str, Any]] = []
    for stage in [s for s in STAGES if s.name in names]:
        limit = stage.quick_timeout_s if args.quick else stage.timeout_s
        left = budget - (time.perf_counter() - t_start)
        if left < limit and stage.optional:
            doc = skipped_doc(stage, args.quick, f"not enough time left ({left:.0f} s < {limit:.0f} s)")
            from bench._common import write_json

            write_json(out / f"{stage.name}.json", doc)
        elif left <= 5:
            doc = skipped_doc(stage, args.quick, f"overall budget of {budget:.0f} s spent")
        else:
            print(f"== {stage.name} (limit {min(limit, left):.0f} s): {stage.title}", flush=True)
            doc = launch_stage(stage, out, args.quick, min(limit, left))
        docs.append(doc)
        write_summary(out, docs, args.quick)
        print(f"   {stage.name}: {doc['status']} in {_fmt(doc.get('elapsed_s'))} s", flush=True)
    path = write_summary(out, docs, args.quick)
    print(render_summary(docs, args.quick))
    print(f"wrote {path}")
    return 0 if all(d["status"] in ("ok", "skipped") for d in docs) else 1


if __name__ == "__main__":
    sys.exit(main())
