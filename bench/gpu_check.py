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
the check cannot rot; ``tests/test_bench_quick.py`` runs it).

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
STAGED_BUDGET_S = 450.0  # the first seven stages together: 7.5 minutes
DEFAULT_BUDGET_S = 480.0  # the whole run; gpu_tests gets what the others leave of it
PEER_SITE = "peer_site"


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


# ------------------------------------------------------------------------------------------------
# shared by stage processes


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
        from importlib import metadata

        for peer in ("inf-cl", "siglip-kernel"):  # the loss_compare peers (--wheels installs them)
            try:
                m[peer] = metadata.version(peer)
            except metadata.PackageNotFoundError:
                m[peer] = "not installed"
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
    per_image = F.cross_entropy(logits, labels, reduction="none")
    return (per_image + F.cross_entropy(logits.T, labels, reduction="none")) / 2


def _siglip64(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(dim=1)


def _loss_check(kind: str, dtype_name: str, dev: Any, b: int, d: int, *, reduction: str = "mean",
                memory_budget: Any = None, distributed: bool = False) -> dict:
    """Fused loss and its gradients vs float64 on the same (low-precision) inputs.

    Tolerance (DESIGN.md): the fused error may be at most twice that of the same formula computed
    with plain torch in the input's precision, plus 1e-4 for the cases where that error is ~0.
    """
    import torch
    import torch.nn.functional as F

    from llm2clip_fast.ops import _backend, _chunking
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(1)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype)
    txt = (0.6 * txt + 0.4 * img).to(dtype)  # positives stand out, as in training
    upstream = (torch.rand(b, generator=g) + 0.5 if reduction == "none" else torch.ones(())).to(dev)
    scale_v, bias_v = (1 / 0.07, None) if kind == "clip" else (10.0, -10.0)
    backend = "triton"  # forced everywhere: a backend that cannot serve raises instead of falling back

    def reduce(per: Any) -> Any:
        return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per

    def run(fn: Callable[..., Any], cast: Any) -> tuple[Any, list[Any]]:
        leaves = [img.to(cast).requires_grad_(), txt.to(cast).requires_grad_(),
                  torch.tensor(scale_v, device=dev, dtype=torch.float32 if cast != torch.float64 else cast,
                               requires_grad=True)]
        if bias_v is not None:
            leaves.append(torch.tensor(bias_v, device=dev, dtype=leaves[2].dtype, requires_grad=True))
        loss = fn(*leaves)
        return loss.detach(), list(torch.autograd.grad(loss, leaves, upstream.to(loss.dtype)))

    _backend.clear_selections()
    if kind == "clip":
        fused = lambda i, t, s: clip_loss(i, t, s, reduction=reduction, backend=backend,
                                          distributed=distributed, memory_budget=memory_budget)
        ref = lambda i, t, s: reduce(_clip64(i, t, s))
    else:
        fused = lambda i, t, s, c: siglip_loss(i, t, s, c, reduction=reduction, backend=backend,
                                               distributed=distributed, memory_budget=memory_budget)
        # OpenCLIP's 'mean' divides the pair-loss total by the number of images.
        ref = lambda i, t, s, c: (_siglip64(i, t, s, c).sum() / b if reduction == "mean"
                                  else reduce(_siglip64(i, t, s, c)))
    loss, grads = run(fused, dtype)
    m: dict[str, Any] = {"backend": _backend.last_selected(f"{kind}_loss"),
                         "path": _chunking.last_path(f"{kind}_loss")}
    loss64, grads64 = run(ref, torch.float64)
    lossp, gradsp = run(ref, dtype)
    names = ["loss", "d_image", "d_text", "d_scale"] + (["d_bias"] if bias_v is not None else [])
    ok = bool(torch.isfinite(loss).all().item())
    for name, x, r, p in zip(names, [loss, *grads], [loss64, *grads64], [lossp, *gradsp]):
        err, err_p = rel_err(x, r), rel_err(p, r)
        tol = 2 * err_p + 1e-4
        m[f"{name}_err"] = err
        m[f"{name}_torch_{dtype_name}_err"] = err_p
        ok = ok and err <= tol
    m["status"] = "ok" if ok else "fail"
    m["note"] = "tol per value: 2 x plain-torch error in the same precision + 1e-4"
    return m


KEEP_ALL = "1TiB"  # a budget that keeps the logits of every size the stage checks


def _recompute_budget(b: int) -> int:
    return 4 * b * b - 1


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
    for dtype in ("bf16", "fp16"):
        for label, budget, reduction in (("keep-logits", KEEP_ALL, "mean"),
                                         ("recompute", _recompute_budget(b), "none")):
            rec.attempt(f"clip {dtype} B={b} D={d} {label} {reduction} (forced triton)",
                        lambda dtype=dtype, budget=budget, reduction=reduction: _loss_check(
                            "clip", dtype, dev, b, d, reduction=reduction, memory_budget=budget))
        for label, reduction in (("one-pass", "mean"), ("two-pass", "none")):
            rec.attempt(f"siglip {dtype} B={b} D={d} {label} {reduction} (forced triton)",
                        lambda dtype=dtype, reduction=reduction: _loss_check("siglip", dtype, dev, b, d,
                                                                             reduction=reduction))

    def single_stream() -> dict:
        os.environ["LLM2CLIP_LOSS_OVERLAP"] = "0"
        try:
            m = _loss_check("clip", "bf16", dev, b, d, reduction="sum", memory_budget=_recompute_budget(b))
        finally:
            del os.environ["LLM2CLIP_LOSS_OVERLAP"]
        m["note"] = "LLM2CLIP_LOSS_OVERLAP=0: every epilogue on the main stream; " + m["note"]
        return m

    rec.attempt(f"clip bf16 B={b} D={d} recompute, one stream (forced triton)", single_stream)
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
# stage: loss_compare


def _matmul_rate(dev: Any, n: int, reps: int) -> dict:
    import torch

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    (ms,) = Timer(dev).split([lambda: torch.mm(a, b)], reps=max(reps, 5) * 4)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def _free(dev: Any) -> None:
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# The order is the priority: the goal size first, the providers the goals compare next.
COMPARE_PROVIDERS = {
    "clip": ["fused", "fused-recompute", "materialised-1gemm-compiled", "inf-cl", "materialised",
             "materialised-1gemm"],
    "siglip": ["fused", "siglip-kernel", "materialised"],
}


def _compare_point(kind: str, provider: str, dev: Any, b: int, d: int, sizes: Sizes,
                   mm_tflops: float) -> dict:
    """One provider at one size: fwd and bwd time, TFLOP/s counting what it executes, its share of
    the matmul rate, peak memory, float64 error on the leading rows."""
    import torch

    from bench.loss_throughput import BIAS, PROVIDERS, SCALE, _fused_factor, float64_errors, make_inputs
    from llm2clip_fast.ops import _backend, _chunking

    prov = PROVIDERS[kind][provider]
    dtype_name = "bf16" if dev.type == "cuda" else "fp32"
    why = prov.unavailable(b, d, dev.type, dtype_name)
    if why:
        return {"status": "skipped", "note": why, "flops_counted": prov.convention}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fn = prov.build(b, d, str(dev))
    img, txt = (t.requires_grad_() for t in make_inputs(b, d, dev, dtype))
    scale = torch.tensor(SCALE[kind], device=dev, requires_grad=True)
    bias = torch.tensor(BIAS, device=dev, requires_grad=True)
    state: dict[str, Any] = {}

    def fwd() -> None:
        img.grad = txt.grad = scale.grad = bias.grad = None
        state["loss"] = fn(img, txt, scale, bias)

    def bwd() -> None:
        state.pop("loss").backward()

    _backend.clear_selections()
    _chunking.clear_paths()
    fwd_ms, bwd_ms = Timer(dev).split([fwd, bwd], reps=sizes.reps)
    peak = _peak_mb(lambda: (fwd(), bwd()), dev)
    m: dict[str, Any] = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "total_ms": fwd_ms + bwd_ms, "peak_mb": peak}
    factor = prov.factor
    if provider.startswith("fused"):
        m["backend"] = _backend.last_selected(f"{kind}_loss")
        m["path"] = _chunking.last_path(f"{kind}_loss")
        factor = _fused_factor(m["path"], factor)
    m["flops_counted"] = f"{factor:g}*B^2*D" + (f" ({m['path']})" if "path" in m else "")
    m["tflops"] = factor * b * b * d / m["total_ms"] / 1e9
    m["frac_of_matmul"] = m["tflops"] / mm_tflops if mm_tflops else None
    _free(dev)
    eb = min(b, sizes.error_b)
    e_img, e_txt = make_inputs(eb, d, dev, dtype)
    m.update(float64_errors(kind, prov.build(eb, d, str(dev)), e_img, e_txt), error_b=eb)
    return m


def _clip_pieces(dev: Any, b: int, d: int, sizes: Sizes) -> list[tuple[str, dict]]:
    """The fused CLIP loss in pieces at one size: the chunk GEMMs alone against GEMM + epilogue, the
    forward and the backward, recompute and keep-logits, with the second stream and without."""
    import torch

    from bench.loss_throughput import make_inputs
    from llm2clip_fast.fp32_matmul import addmm_fp32_, mm_fp32_out
    from llm2clip_fast.ops._chunk_schedule import chunk_bounds
    from llm2clip_fast.ops.clip_loss import clip_lse_backward, clip_lse_forward, plan_clip_chunks

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    img, txt = make_inputs(b, d, dev, dtype)
    s = torch.tensor(1 / 0.07, device=dev)
    budget = min(_recompute_budget(b), 16 << 30)
    backend = "triton"
    plan = plan_clip_chunks(b, b, dev, dtype, backend, needs_grad=False, memory_budget_bytes=budget)
    bounds = chunk_bounds(b, plan.rows)
    ws = torch.empty(plan.rows, b, device=dev, dtype=torch.float32)
    g = torch.rand(plan.rows, b, device=dev).to(dtype)
    d_image = torch.empty(b, d, device=dev)
    d_text = torch.zeros(b, d, device=dev)
    coef = torch.full((b,), 0.5 / b, device=dev)

    def gemms_forward() -> None:
        for r0, r1 in bounds:
            mm_fp32_out(img[r0:r1], txt.t(), ws[: r1 - r0])

    def gemms_backward(recompute: bool) -> None:
        for r0, r1 in bounds:
            if recompute:
                mm_fp32_out(img[r0:r1], txt.t(), ws[: r1 - r0])
            mm_fp32_out(g[: r1 - r0], txt, d_image[r0:r1])
            addmm_fp32_(d_text, g[: r1 - r0].t(), img[r0:r1])

    row_lse, col_lse = clip_lse_forward(img, txt, s, backend=backend, memory_budget=budget)
    out: list[tuple[str, dict]] = []
    flops = 2.0 * b * b * d
    timer = Timer(dev)

    def rate(ms: float, units: float) -> float:
        return units * flops / ms / 1e9

    (t_gemm_f,) = timer.split([gemms_forward], reps=sizes.reps)
    (t_gemm_b,) = timer.split([lambda: gemms_backward(True)], reps=sizes.reps)
    (t_gemm_bk,) = timer.split([lambda: gemms_backward(False)], reps=sizes.reps)
    for overlap in ("1", "0"):
        os.environ["LLM2CLIP_LOSS_OVERLAP"] = overlap
        try:
            (t_f,) = timer.split([lambda: clip_lse_forward(img, txt, s, backend=backend,
                                                           memory_budget=budget)], reps=sizes.reps)
            (t_b,) = timer.split([lambda: clip_lse_backward(img, txt, s, row_lse, col_lse, coef, coef,
                                                            backend=backend, memory_budget=budget)],
                                 reps=sizes.reps)
        finally:
            del os.environ["LLM2CLIP_LOSS_OVERLAP"]
        label = "second stream" if overlap == "1" else "one stream"
        out.append((f"clip pieces B={b}: forward, {label}",
                    {"chunk_rows": plan.rows, "chunks": len(bounds), "gemm_ms": t_gemm_f, "gemm_tflops":
                     rate(t_gemm_f, 1), "with_epilogue_ms": t_f, "tflops": rate(t_f, 1),
                     "epilogue_overhead": t_f / t_gemm_f - 1}))
        out.append((f"clip pieces B={b}: backward (recompute), {label}",
                    {"gemm_ms": t_gemm_b, "gemm_tflops": rate(t_gemm_b, 3), "with_epilogue_ms": t_b,
                     "tflops": rate(t_b, 3), "epilogue_overhead": t_b / t_gemm_b - 1}))
    try:
        _, _, kept = clip_lse_forward(img, txt, s, backend=backend, keep_logits=True, memory_budget=KEEP_ALL)
    except torch.OutOfMemoryError as exc:
        out.append((f"clip pieces B={b}: backward (keep-logits)",
                    {"status": "skipped", "note": str(exc)[:200]}))
        return out
    (t_bk,) = timer.split([lambda: clip_lse_backward(img, txt, s, row_lse, col_lse, coef, coef, logits=kept,
                                                     backend=backend)], reps=sizes.reps)
    out.append((f"clip pieces B={b}: backward (keep-logits), second stream",
                {"gemm_ms": t_gemm_bk, "gemm_tflops": rate(t_gemm_bk, 2), "with_epilogue_ms": t_bk,
                 "tflops": rate(t_bk, 2), "epilogue_overhead": t_bk / t_gemm_bk - 1}))
    return out


def _goals(results: dict[tuple[str, str, int], dict], b: int, d: int, mm_tflops: float, gpu: bool) -> dict:
    """Issue 24's GPU goals at B, met or missed, from the measured rows (on CPU: computed, not judged)."""
    def get(kind: str, provider: str) -> dict | None:
        r = results.get((kind, provider, b))
        return r if r and r.get("status", "ok") == "ok" and "total_ms" in r else None

    m: dict[str, Any] = {"B": b, "matmul_tflops": mm_tflops}
    recompute, keep = get("clip", "fused-recompute"), get("clip", "fused")
    plain, infcl = get("clip", "materialised-1gemm-compiled"), get("clip", "inf-cl")
    sig, sigk = get("siglip", "fused"), get("siglip", "siglip-kernel")
    met: list[bool] = []
    if recompute:
        m["clip_recompute_frac_8BBD"] = 8.0 * b * b * d / recompute["total_ms"] / 1e9 / mm_tflops
        met.append(m["clip_recompute_frac_8BBD"] >= 0.70)
    if recompute and plain:
        m["recompute_speed_vs_plain"] = plain["total_ms"] / recompute["total_ms"]
        m["recompute_memory_vs_plain"] = recompute["peak_mb"] / plain["peak_mb"]
        met += [m["recompute_speed_vs_plain"] >= 0.85, m["recompute_memory_vs_plain"] <= 1 / 8]
    if keep and plain and keep.get("path") == "keep-logits":
        m["keep_speed_vs_plain"] = plain["total_ms"] / keep["total_ms"]
        met.append(m["keep_speed_vs_plain"] >= 1.1)
    if keep and infcl:
        m["fused_speed_vs_inf_cl"] = infcl["total_ms"] / keep["total_ms"]
        met.append(m["fused_speed_vs_inf_cl"] >= 3.0)
    if sig and sigk:
        m["siglip_speed_vs_siglip_kernel"] = sigk["total_ms"] / sig["total_ms"]
        err_ok = all(sig.get(k, 0) <= sigk.get(k, 0) * 1.0001 + 1e-7 for k in ("loss_err", "d_image_err",
                                                                                "d_text_err"))
        m["siglip_error_le_siglip_kernel"] = err_ok
        met += [m["siglip_speed_vs_siglip_kernel"] >= 1.0, err_ok]
    m["goals_met"] = f"{sum(met)}/{len(met)}"
    m["status"] = "skipped" if not (gpu and met) else "ok" if all(met) else "fail"
    m["note"] = ("targets: recompute >= 70 % of matmul (8BBD), >= 0.85x plain compiled at <= 1/8 memory; "
                 "keep >= 1.1x plain; >= 3x Inf-CL; SigLIP >= siglip-kernel at <= its error")
    return m


def stage_loss_compare(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    mm = _matmul_rate(dev, sizes.matmul_n, sizes.reps)
    rec.add(f"matmul {mm['dtype']} {sizes.matmul_n}^3", "ok", **mm)
    if quick:
        rec.note("quick: the torch.compile'd provider is not measured (CPU code generation takes minutes)")
    results: dict[tuple[str, str, int], dict] = {}
    d = sizes.compare_d
    for b in sizes.compare_b:
        for kind in ("clip", "siglip"):
            for provider in COMPARE_PROVIDERS[kind]:
                if quick and "compiled" in provider:
                    continue

                def run(kind: str = kind, provider: str = provider, b: int = b) -> dict:
                    r = _compare_point(kind, provider, dev, b, d, sizes, mm["tflops"])
                    results[(kind, provider, b)] = r
                    return r

                rec.attempt(f"{kind} {provider} fwd+bwd B={b} D={d}", run)
                _free(dev)
            if kind == "clip":
                from llm2clip_fast.kernels import clip_loss as clip_kernels

                rec.add(f"clip epilogue configs B={b}", "ok", **clip_kernels.chosen_configs())
        from llm2clip_fast.kernels import siglip_loss as siglip_kernels

        rec.add(f"siglip epilogue configs B={b}", "ok", **siglip_kernels.chosen_configs())
        rec.attempt(f"goals B={b}", lambda b=b: _goals(results, b, d, mm["tflops"], dev.type == "cuda"))
        for name, metrics in _safe_pieces(rec, dev, b, d, sizes):
            status = metrics.pop("status", "ok")
            rec.add(name, status, metrics.pop("note", ""), **metrics)
        _free(dev)


def _safe_pieces(rec: Recorder, dev: Any, b: int, d: int, sizes: Sizes) -> list[tuple[str, dict]]:
    try:
        return _clip_pieces(dev, b, d, sizes)
    except Exception as exc:
        rec.add(f"clip pieces B={b}", "error", note=f"{type(exc).__name__}: {exc}"[-600:])
        traceback.print_exc()
        return []


# ------------------------------------------------------------------------------------------------
# stages owned by other scripts: stage2_step, embed, adapter


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


# ------------------------------------------------------------------------------------------------
# stage: clip_1m


def stage_clip_1m(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    from llm2clip_fast.ops import _backend, _chunking
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
        path = _chunking.last_path("clip_loss")
        tf = (6.0 if path == "keep-logits" else 8.0) * b * b * d / secs / 1e12
        goal = peak is None or peak <= 20 * 1000  # MB: B = 2^20 within 20 GB above the inputs
        return {"status": "ok" if finite and goal else "fail", "backend": _backend.last_selected("clip_loss"),
                "path": path, "loss": state["loss"].item(), "finite": finite, "step_s": secs, "tflops": tf,
                "peak_above_inputs_mb": peak, "inputs_mb": inputs_mb, "goal_20gb_met": goal,
                "note": "first call: includes the epilogues' compilation; goal: <= 20 GB above the inputs"}

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


STAGE_FUNCS: dict[str, Callable[[Recorder, Any, Sizes, bool], None]] = {
    "env": lambda rec, dev, sizes, quick: stage_env(rec, dev, sizes, quick),
    "correctness": lambda rec, dev, sizes, quick: stage_correctness(rec, dev, sizes, quick),
    "loss_compare": lambda rec, dev, sizes, quick: stage_loss_compare(rec, dev, sizes, quick),
    **{name: (lambda rec, dev, sizes, quick, module=module: run_delegated_stage(rec, dev, module, quick))
       for name, module in DELEGATED.items()},
    "clip_1m": lambda rec, dev, sizes, quick: stage_clip_1m(rec, dev, sizes, quick),
    "gpu_tests": lambda rec, dev, sizes, quick: stage_gpu_tests(rec, dev, sizes, quick),
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
# parent: installs the peers' wheels, runs stages, merges status, writes summary.md


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


def launch_stage(stage: Stage, out: Path, quick: bool, timeout_s: float,
                 site: Path | None = None) -> dict[str, Any]:
    """Run one stage in a fresh process under ``timeout_s`` (``site``: the peers' wheels, on its path);
    returns its merged JSON document."""
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
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(quick, site),
                                cwd=REPO_ROOT, start_new_session=True)
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
    t_start = time.perf_counter()
    docs: list[dict[str, Any]] = []
    for stage in [s for s in STAGES if s.name in names]:
        left = budget - (time.perf_counter() - t_start)
        limit = (stage.quick_budget_s if args.quick else stage.budget_s) or left
        if left <= 5:
            doc = skipped_doc(stage, args.quick, f"overall budget of {budget:.0f} s spent")
            from bench._common import write_json

            write_json(out / f"{stage.name}.json", doc)
        else:
            print(f"== {stage.name} (limit {min(limit, left):.0f} s): {stage.title}", flush=True)
            doc = launch_stage(stage, out, args.quick, min(limit, left), site)
        docs.append(doc)
        write_summary(out, docs, args.quick)
        print(f"   {stage.name}: {doc['status']} in {_fmt(doc.get('elapsed_s'))} s", flush=True)
    path = write_summary(out, docs, args.quick)
    print(render_summary(docs, args.quick))
    print(f"wrote {path}")
    return 0 if all(d["status"] in ("ok", "skipped") for d in docs) else 1


if __name__ == "__main__":
    sys.exit(main())
