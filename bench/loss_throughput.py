"""Forward+backward throughput, peak memory and float64 error of the contrastive losses, ours beside what
a user would otherwise run, in one run.

Every (loss, provider, B, D) point runs in its own subprocess: median fwd+bwd time, achieved TFLOP/s
counting the FLOPs the provider executes (its convention is in each row, ``flops_counted``), peak
memory (CUDA: max allocated; CPU: peak RSS, absolute and above the process's baseline once the inputs
exist), the error of the loss and of every gradient against float64 on the same inputs (the leading
``--error-batch`` rows, float64 on the device), and "OOM" instead of a crash. A provider that cannot run
here (package absent, CUDA only, D it cannot take) is a ``skipped`` row with the reason.

CLIP providers (``--loss clip``):

- ``fused``: llm2clip_fast ``clip_loss``, automatic backend, default memory budget. Counts what the path
  that ran executes: 6*B^2*D with ``keep-logits``, 8*B^2*D with ``recompute`` (the row says which).
- ``fused-recompute``: the same with a budget just below the B x B fp32 logits (the O(B*D) path): 8*B^2*D.
- ``fused-torch``: ``clip_loss`` on its pure-torch backend (the same chunks), default budget.
- ``materialised``, ``materialised-compiled``: OpenCLIP's ``ClipLoss`` as written (its second logit GEMM
  ``text @ image.T`` included), eager and ``torch.compile``d: 12*B^2*D, what it executes.
- ``materialised-1gemm``, ``materialised-1gemm-compiled``: the best plain loss a user would write, one
  logit GEMM and ``logits.T`` for the other direction: 6*B^2*D.
- ``inf-cl``: Inf-CL 1.2.1, one direction per call, so two calls; fp32 operands with TF32 dots; D a
  multiple of its head_dim: 20*B^2*D (per call: forward 2, backward recomputes the logits in its dq and
  its dk kernel, 2 + 2, and the two products, 2 + 2). CUDA only. Its single-process path
  (``cal_flash_loss``, what ``cal_inf_loss`` runs without a process group, minus the scale's
  ``GradientGather``, whose backward all-reduces and needs a process group).

SigLIP providers (``--loss siglip``): ``fused`` (one-pass for a mean loss with gradients: 6*B^2*D),
``fused-torch`` (the same on the pure-torch backend),
``materialised`` and ``materialised-compiled`` (OpenCLIP's ``SigLipLoss``, one GEMM: 6*B^2*D), and
``siglip-kernel`` (siglip-kernel 0.1.2, ``fused_siglip_loss(img, txt, log_temperature, bias)``: cuBLAS
chunks in the input dtype for bf16/fp16, 6*B^2*D; CUDA only).

Peers are not dependencies: on a GPU box without internet install the wheels ``gpu_check.py --wheels``
carries (``pip download --no-deps inf-cl==1.2.1 siglip-kernel==0.1.2 -d .whl``), or
``pip install -c requirements/pins.txt inf-cl siglip-kernel`` where PyPI answers.

Default sweeps (``--batch`` / ``--providers`` / ``--dim`` replace them; given flags run their full
product):

- CUDA (bf16, D=1024): every provider at B in {8192, 65536} (the materialised B x B matrices fit an
  80+ GB GPU there), then ``fused`` alone at B = 2^20.
- CPU (fp32, D=512): every provider at B in {2048, 8192} (the peers report why they are skipped),
  then the CPU target: ``fused`` (default budget) against ``materialised-1gemm-compiled`` at B = 8192,
  and ``fused-recompute`` at B = 32768, where the plain loss would need 8+ GB (``--no-target`` skips it).

Each fused row's ``backend`` and ``path`` are what the op recorded (never a prediction).

Examples::

    python bench/loss_throughput.py --quick
    python bench/loss_throughput.py                      # CPU: the sweep and the target points
    python bench/loss_throughput.py --device cuda        # CUDA: the default sweep above
    python bench/loss_throughput.py --batch 8192 --dim 512 --providers fused materialised-1gemm-compiled
    python bench/loss_throughput.py --batch 8192 --dim 512 --providers fused materialised-1gemm-compiled \
        --interleave 8                                   # one process, steps alternating: for shared machines
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import (
    add_common_args,
    cuda_peak_mb,
    machine_description,
    mark_memory_baseline,
    measured_matmul_tflops,
    print_table,
    run_point_in_subprocess,
    tflops,
    time_fn,
    write_json,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A loss as the bench calls it: (image, text, scale, bias) -> 0-dim loss; CLIP losses ignore bias.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PEER_VERSIONS = {"inf_cl": "inf-cl==1.2.1", "siglip_kernel": "siglip-kernel==0.1.2"}


# ---------------------------------------------------------------------------------------------------
# the plain losses a user would write


def openclip_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """OpenCLIP ``ClipLoss.forward`` for one process, as OpenCLIP computes it (two B x B matmuls)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def one_gemm_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """The same loss with one logit GEMM: ``logits.T`` is the text->image direction."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def openclip_siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """OpenCLIP ``SigLipLoss.forward`` for one process, as OpenCLIP computes it (B x B logits and labels)."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def _clip(fn: Callable[..., torch.Tensor]) -> LossFn:
    return lambda img, txt, scale, bias: fn(img, txt, scale)


# ---------------------------------------------------------------------------------------------------
# providers


def _recompute_budget(b: int, device: str) -> int:
    """Just below the B x B fp32 logits (and at most the default): the recompute path, full chunks."""
    from llm2clip_fast.ops._chunking import memory_budget

    return min(4 * b * b - 1, memory_budget(torch.device(device)))


def _fused_clip(b: int, d: int, device: str, recompute: bool, backend: str | None = None) -> LossFn:
    from llm2clip_fast.ops.clip_loss import clip_loss

    budget = _recompute_budget(b, device) if recompute else None
    return _clip(lambda img, txt, scale: clip_loss(img, txt, scale, memory_budget=budget, backend=backend))


def _fused_siglip(b: int, d: int, device: str, backend: str | None = None) -> LossFn:
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    return lambda img, txt, scale, bias: siglip_loss(img, txt, scale, bias, backend=backend)


def _inf_cl_head_dim(d: int) -> int | None:
    """Inf-CL splits D into heads of 16..256 (a power of two): the largest that divides D."""
    return next((h for h in (256, 128, 64, 32, 16) if d % h == 0), None)


def _inf_cl(b: int, d: int, device: str) -> LossFn:
    # cal_inf_loss without a process group runs _cal_flash_loss(scale * q, k, ...).mean(), but first
    # wraps the scale in GradientGather, whose backward all-reduces and so needs a process group (ring.py).
    # cal_flash_loss is that same single-process computation without the wrapper.
    from inf_cl import cal_flash_loss

    head = _inf_cl_head_dim(d)

    def loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # One direction per call (the README's usage): image->text, then text->image.
        return 0.5 * (cal_flash_loss(img, txt, scale=scale, head_dim=head).mean()
                      + cal_flash_loss(txt, img, scale=scale, head_dim=head).mean())

    return loss


def _siglip_kernel(b: int, d: int, device: str) -> LossFn:
    from siglip_kernel import fused_siglip_loss

    # It takes log(temperature); the bench's scale is the multiplier.
    return lambda img, txt, scale, bias: fused_siglip_loss(img, txt, torch.log(scale), bias).float()


def _peer_reason(module: str, device: str, cuda_only: str) -> str | None:
    if device != "cuda":
        return f"{PEER_VERSIONS[module]} {cuda_only}"
    try:
        importlib.import_module(module)
    except Exception as exc:  # absent, or fails to import here: skipped with the reason, never dropped
        return (f"{PEER_VERSIONS[module]} is not importable ({type(exc).__name__}: {exc}); install its wheel "
                f"(bench/gpu_check.py --wheels DIR) or `pip install {PEER_VERSIONS[module]}`")
    return None


def _inf_cl_reason(b: int, d: int, device: str, dtype: str) -> str | None:
    why = _peer_reason("inf_cl", device, "runs CUDA tensors only (its flash.py asserts q.is_cuda)")
    if why is None and _inf_cl_head_dim(d) is None:
        why = f"Inf-CL needs D a multiple of a head_dim in 16..256; D={d}"
    return why


def _siglip_kernel_reason(b: int, d: int, device: str, dtype: str) -> str | None:
    return _peer_reason("siglip_kernel", device,
                        "runs CUDA tensors only (it reads the GPU's compute capability at import)")


@dataclass(frozen=True)
class Provider:
    """One way of computing a loss: how to build it, what it executes, and whether it runs here."""

    build: Callable[[int, int, str], LossFn]  # (B, D, device) -> loss
    convention: str  # the FLOPs of one fwd+bwd it executes, as a formula ("fused": by path)
    factor: float  # ... times B^2 * D (fused: the recompute path's; the row's path decides)
    note: str
    unavailable: Callable[[int, int, str, str], str | None] = lambda b, d, device, dtype: None


def _fused_factor(path: str | None, default: float) -> float:
    return {"keep-logits": 6.0, "recompute": 8.0, "one-pass": 6.0, "two-pass": 8.0}.get(path or "", default)


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn, dynamic=False)


PROVIDERS: dict[str, dict[str, Provider]] = {
    "clip": {
        "fused": Provider(lambda b, d, dev: _fused_clip(b, d, dev, recompute=False),
                          "6*B^2*D (keep-logits) or 8*B^2*D (recompute)", 8.0,
                          "llm2clip_fast clip_loss, automatic backend, default memory budget"),
        "fused-recompute": Provider(lambda b, d, dev: _fused_clip(b, d, dev, recompute=True), "8*B^2*D", 8.0,
                                    "llm2clip_fast clip_loss, budget below the logits: the O(B*D) path"),
        "fused-torch": Provider(lambda b, d, dev: _fused_clip(b, d, dev, recompute=False, backend="torch"),
                                "6*B^2*D (keep-logits) or 8*B^2*D (recompute)", 8.0,
                                "llm2clip_fast clip_loss on the pure-torch backend (same chunks)"),
        "materialised": Provider(lambda b, d, dev: _clip(openclip_clip_loss), "12*B^2*D", 12.0,
                                 "OpenCLIP ClipLoss as written (two logit GEMMs), eager"),
        "materialised-compiled": Provider(lambda b, d, dev: _clip(_compiled(openclip_clip_loss)), "12*B^2*D",
                                          12.0, "torch.compile(OpenCLIP ClipLoss as written)"),
        "materialised-1gemm": Provider(lambda b, d, dev: _clip(one_gemm_clip_loss), "6*B^2*D", 6.0,
                                       "plain loss with one logit GEMM (logits.T for text->image), eager"),
        "materialised-1gemm-compiled": Provider(lambda b, d, dev: _clip(_compiled(one_gemm_clip_loss)),
                                                "6*B^2*D", 6.0, "torch.compile(one-GEMM plain loss)"),
        "inf-cl": Provider(_inf_cl, "20*B^2*D", 20.0, "Inf-CL 1.2.1 single process (cal_flash_loss), both "
                           "directions (TF32)",
                           _inf_cl_reason),
    },
    "siglip": {
        "fused": Provider(_fused_siglip, "6*B^2*D (one-pass)", 6.0,
                          "llm2clip_fast siglip_loss, automatic backend"),
        "fused-torch": Provider(lambda b, d, dev: _fused_siglip(b, d, dev, backend="torch"),
                                "6*B^2*D (one-pass)", 6.0,
                                "llm2clip_fast siglip_loss on the pure-torch backend (same chunks)"),
        "materialised": Provider(lambda b, d, dev: openclip_siglip_loss, "6*B^2*D", 6.0,
                                 "OpenCLIP SigLipLoss as written, eager"),
        "materialised-compiled": Provider(lambda b, d, dev: _compiled(openclip_siglip_loss), "6*B^2*D", 6.0,
                                          "torch.compile(OpenCLIP SigLipLoss)"),
        "siglip-kernel": Provider(_siglip_kernel, "6*B^2*D", 6.0,
                                  "siglip-kernel 0.1.2 fused_siglip_loss (auto: cuBLAS chunks for bf16/fp16)",
                                  _siglip_kernel_reason),
    },
}


# ---------------------------------------------------------------------------------------------------
# one point


def make_inputs(b: int, d: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm features with positives that stand out (as after some training), in ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = F.normalize(0.6 * F.normalize(torch.randn(b, d, generator=g), dim=-1) + 0.4 * img, dim=-1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


SCALE = {"clip": 1 / 0.07, "siglip": 10.0}
BIAS = -10.0


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    diff = (x - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def _loss_and_grads(fn: LossFn, img: torch.Tensor, txt: torch.Tensor, scale: float,
                    leaf_dtype: torch.dtype) -> list[torch.Tensor]:
    leaves = [img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_(),
              torch.tensor(scale, device=img.device, dtype=leaf_dtype, requires_grad=True),
              torch.tensor(BIAS, device=img.device, dtype=leaf_dtype, requires_grad=True)]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach(), *(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))]


def float64_errors(loss: str, fn: LossFn, img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
    """Relative error (max |x - ref| / max |ref|) of the loss and each gradient against float64 on
    the same inputs (OpenCLIP's formula, upcast)."""
    got = _loss_and_grads(fn, img, txt, SCALE[loss], torch.float32)
    ref_fn = _clip(openclip_clip_loss) if loss == "clip" else openclip_siglip_loss
    want = _loss_and_grads(ref_fn, img.double(), txt.double(), SCALE[loss], torch.float64)
    names = ["loss", "d_image", "d_text", "d_scale"] + (["d_bias"] if loss == "siglip" else [])
    return {f"{name}_err": _rel_err(g, w) for name, g, w in zip(names, got, want)}


def point(
    loss: str, provider: str, batch: int, dim: int, device: str, dtype: str, budget_s: float,
    error_batch: int = 2048,
) -> dict[str, Any]:
    """One measurement (runs in a fresh subprocess, see bench._common.run_point_in_subprocess)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    prov = PROVIDERS[loss][provider]
    why = prov.unavailable(batch, dim, device, dtype)
    if why:
        return {"status": "skipped", "reason": why, "flops_counted": prov.convention}
    dt = DTYPES[dtype]
    out: dict[str, Any] = {"flops_counted": prov.convention}
    from llm2clip_fast.ops import _backend, _chunking

    # The error against float64 first, on the leading rows of the same inputs: outside the measured
    # memory (the peak counter is reset below).
    if error_batch > 0:
        eb = min(batch, error_batch)
        img, txt = make_inputs(eb, dim, dev, dt)
        out.update(float64_errors(loss, prov.build(eb, dim, device), img, txt), error_batch=eb)
        del img, txt
    fn = prov.build(batch, dim, device)
    img, txt = (t.requires_grad_() for t in make_inputs(batch, dim, dev, dt))
    scale = torch.tensor(SCALE[loss], device=dev, requires_grad=True)
    bias = torch.tensor(BIAS, device=dev, requires_grad=True)

    def step() -> None:
        img.grad = txt.grad = scale.grad = bias.grad = None
        fn(img, txt, scale, bias).backward()

    _backend.clear_selections()
    _chunking.clear_paths()
    step()  # warm-up (and torch.compile's compilation) outside the measurement
    img.grad = txt.grad = scale.grad = bias.grad = None  # the gradients count as the loss's own memory
    if dev.type == "cuda":
        torch.cuda.synchronize()
    mark_memory_baseline()
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(step, dev)
        out.update(peak_mb=peak, peak_above_baseline_mb=peak - before)
    timing = time_fn(step, device=dev, warmup=0, budget_s=budget_s, max_reps=20)
    factor = prov.factor
    if provider.startswith("fused"):  # which backend and path served, so a row is never ambiguous
        out["backend"] = _backend.last_selected(f"{loss}_loss")
        out["path"] = _chunking.last_path(f"{loss}_loss")
        factor = _fused_factor(out["path"], factor)
        out["flops_counted"] = f"{factor:g}*B^2*D ({out['path']})"
        if out["backend"] == "cpu" and loss == "clip":  # the epilogue build that ran (LLM2CLIP_CPU_ISA)
            from llm2clip_fast import _C

            out["cpu_isa"] = _C.clip_epilogue_isa()
        if out["backend"] == "triton":
            kernels = importlib.import_module(f"llm2clip_fast.kernels.{loss}_loss")
            out["configs"] = "; ".join(f"{k}: {v}" for k, v in kernels.chosen_configs().items())
    out.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
               tflops=tflops(factor * batch * batch * dim, timing.median_ms))
    return out


def run_point(
    loss: str, provider: str, batch: int, dim: int, device: str, dtype: str, budget_s: float,
    timeout_s: float = 1800, error_batch: int = 2048,
) -> dict[str, Any]:
    kwargs = {"loss": loss, "provider": provider, "batch": batch, "dim": dim, "device": device,
              "dtype": dtype, "budget_s": budget_s, "error_batch": error_batch}
    # Triton reads TRITON_CACHE_AUTOTUNING when a kernel module is imported: with it, the first
    # child tunes a shape and later children load the winner from Triton's cache directory.
    env = {"TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1")}
    res = run_point_in_subprocess("bench.loss_throughput:point", kwargs, timeout_s=timeout_s, env=env)
    row = {"loss": loss, "provider": provider, "B": batch, "D": dim, "dtype": dtype, "device": device, **res}
    if device == "cpu" and "peak_rss_mb" in res and res.get("status") == "ok":
        row["peak_mb"] = res["peak_rss_mb"]
    return row


# ---------------------------------------------------------------------------------------------------
# sweeps


def interleaved(loss: str, providers: list[str], batch: int, dim: int, device: str, dtype: str,
                rounds: int) -> dict[str, Any]:
    """All ``providers`` in one process on the same inputs, their fwd+bwd steps alternating for
    ``rounds`` rounds: on a shared machine each sees the same load, so their ratio means something.
    Returns per provider min and median ms (and the fused rows' path)."""
    import statistics
    import time

    from llm2clip_fast.ops import _chunking

    dev = torch.device(device)
    img, txt = (t.requires_grad_() for t in make_inputs(batch, dim, dev, DTYPES[dtype]))
    scale = torch.tensor(SCALE[loss], device=dev, requires_grad=True)
    bias = torch.tensor(BIAS, device=dev, requires_grad=True)
    fns = {p: PROVIDERS[loss][p].build(batch, dim, device) for p in providers}
    paths: dict[str, str | None] = {}
    times: dict[str, list[float]] = {p: [] for p in providers}

    def step(p: str) -> float:
        img.grad = txt.grad = scale.grad = bias.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fns[p](img, txt, scale, bias).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000

    for p in providers:  # warm-up and compilation
        step(p)
        paths[p] = _chunking.last_path(f"{loss}_loss") if p.startswith("fused") else None
    for _ in range(rounds):
        for p in providers:
            times[p].append(step(p))
    return {"providers": {p: {"min_ms": min(t), "median_ms": statistics.median(t), "path": paths[p],
                              "times_ms": t} for p, t in times.items()}}


CUDA_FUSED_ONLY_B = 1 << 20
CPU_TARGET_B, CPU_TARGET_D, CPU_BIG_B = 8192, 512, 32768


def _default_sweep(device: str, quick: bool) -> tuple[list[int], list[int], str]:
    if quick:
        return [64], [32], "fp32" if device == "cpu" else "bf16"
    if device == "cuda":
        return [8192, 65536, CUDA_FUSED_ONLY_B], [1024], "bf16"
    return [2048, 8192], [512], "fp32"


def default_providers_at(device: str, b: int, providers: list[str], quick: bool) -> list[str]:
    """The default providers at batch ``b`` (used only when ``--providers`` is not given)."""
    providers = [p for p in providers if p != "fused-torch"]  # on request: a fallback, not a contender
    if device == "cuda":
        # Past 65536 the materialised B x B matrices (and their gradients) no longer fit one GPU.
        return [p for p in providers if p == "fused" or b < CUDA_FUSED_ONLY_B]
    # torch.compile's CPU code generation takes minutes on 2 cores: a quick run leaves it out (and
    # the recompute variant), so it starts as few processes as it can; the peers say why they skip.
    if quick:
        return [p for p in providers if "compiled" not in p and p != "fused-recompute"]
    return providers


def cpu_target(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The CPU goals: fused (default budget) >= 1.0x the compiled one-GEMM loss at B = 8192, D = 512,
    fp32; and the recompute path at B = 32768 in O(B*D) memory (peak above inputs against their size)."""
    def find(provider: str, b: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["provider"], r["B"], r["D"], r["dtype"]) ==
                     (provider, b, CPU_TARGET_D, "fp32") and r.get("status") == "ok"), None)

    fused, plain = find("fused", CPU_TARGET_B), find("materialised-1gemm-compiled", CPU_TARGET_B)
    big = find("fused-recompute", CPU_BIG_B)
    if fused is None and big is None:
        return None
    out: dict[str, Any] = {"B": CPU_TARGET_B, "D": CPU_TARGET_D, "dtype": "fp32"}
    if fused is not None and plain is not None:
        speed = plain["median_ms"] / fused["median_ms"]
        out.update(fused_path=fused.get("path"), fused_ms=fused["median_ms"],
                   plain_compiled_ms=plain["median_ms"], speed_vs_plain_compiled=speed, speed_target=1.0,
                   speed_ok=speed >= 1.0)
    if big is not None:
        inputs_mb = 2 * CPU_BIG_B * CPU_TARGET_D * 4 / 2**20
        plain_logits_mb = 2 * CPU_BIG_B * CPU_BIG_B * 4 / 2**20  # the logits and their gradient
        out.update(big_B=CPU_BIG_B, big_path=big.get("path"), big_ms=big["median_ms"],
                   big_peak_above_inputs_mb=big["peak_above_baseline_mb"], inputs_mb=inputs_mb,
                   plain_needs_at_least_mb=plain_logits_mb,
                   big_memory_over_inputs=big["peak_above_baseline_mb"] / inputs_mb)
    return out


COLUMNS = ["loss", "provider", "backend", "path", "B", "D", "dtype", "status", "median_ms", "tflops",
           "flops_counted", "peak_above_baseline_mb", "loss_err", "d_image_err", "reason"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, default_out="bench/results/loss_throughput.json")
    parser.add_argument("--loss", default="clip", choices=sorted(PROVIDERS))
    parser.add_argument("--providers", nargs="+", help="subset of the loss's providers (default: all)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes B (default depends on device)")
    parser.add_argument("--dim", type=int, nargs="+", help="feature dims D")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="fp32 on CPU, bf16 on CUDA by default")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per point (seconds)")
    parser.add_argument("--error-batch", type=int, default=None,
                        help="rows for the float64 error check (default 2048 on CPU, 16384 on CUDA; 0: none)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="instead of a point per provider: every --providers at one --batch/--dim in one "
                        "process, their steps alternating ROUNDS times (ratios that mean something on a "
                        "shared machine)")
    parser.add_argument("--no-target", action="store_true",
                        help="skip the CPU target points (B=8192 against the compiled plain loss, B=32768)")
    args = parser.parse_args(argv)

    table = PROVIDERS[args.loss]
    providers = args.providers or list(table)
    unknown = [p for p in providers if p not in table]
    if unknown:
        parser.error(f"--providers: unknown {unknown}; {args.loss} has {list(table)}")
    batches, dims, dtype = _default_sweep(args.device, args.quick)
    batches, dims, dtype = args.batch or batches, args.dim or dims, args.dtype or dtype
    budget = args.budget_s if args.budget_s is not None else (0.05 if args.quick else 2.0)
    error_batch = args.error_batch if args.error_batch is not None else (
        64 if args.quick else 16384 if args.device == "cuda" else 2048)

    def providers_at(b: int) -> list[str]:
        if args.providers is not None:
            return providers
        return default_providers_at(args.device, b, providers, args.quick)

    if args.interleave:
        return _main_interleaved(args, providers, batches, dims, dtype)
    rows: list[dict[str, Any]] = []
    for d in dims:
        for b in batches:
            for p in providers_at(b):
                rows.append(run_point(args.loss, p, b, d, args.device, dtype, budget,
                                      error_batch=error_batch))
                print_table(rows[-1:], COLUMNS)
    if args.device == "cpu" and args.loss == "clip" and not args.quick and not args.no_target:
        for p, b in (("fused", CPU_TARGET_B), ("materialised-1gemm-compiled", CPU_TARGET_B),
                     ("fused-recompute", CPU_BIG_B)):
            key = (p, b, CPU_TARGET_D, "fp32")
            done = [r for r in rows if (r["provider"], r["B"], r["D"], r["dtype"]) == key]
            if not done:
                row = run_point("clip", p, b, CPU_TARGET_D, "cpu", "fp32", budget, error_batch=error_batch)
                rows.append({**row, "target_point": True})
                print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS, title=f"{args.loss} loss, fwd+bwd, {args.device}")
    target = cpu_target(rows) if args.device == "cpu" and args.loss == "clip" else None
    if target:
        print("CPU target:", target)

    payload = {
        "machine": machine_description(),
        "matmul_tflops": measured_matmul_tflops(args.device, DTYPES[dtype]),
        "loss": args.loss,
        "flops_convention": {p: table[p].convention for p in providers},
        "providers": {p: table[p].note for p in providers},
        "error_convention": "max|x - ref| / max|ref| against float64 on the leading error_batch rows",
        "rows": rows,
        "cpu_target": target,
    }
    path = write_json(args.out, payload)
    print(f"matmul roofline: {payload['matmul_tflops']:.3g} TFLOP/s ({dtype}); wrote {path}")
    return 0


def _main_interleaved(args: argparse.Namespace, providers: list[str], batches: list[int], dims: list[int],
                      dtype: str) -> int:
    if len(batches) != 1 or len(dims) != 1 or len(providers) < 2:
        raise SystemExit("--interleave needs one --batch, one --dim and at least two --providers")
    kwargs = {"loss": args.loss, "providers": providers, "batch": batches[0], "dim": dims[0],
              "device": args.device, "dtype": dtype, "rounds": args.interleave}
    res = run_point_in_subprocess("bench.loss_throughput:interleaved", kwargs, timeout_s=3600)
    if res.get("status") != "ok":
        raise SystemExit(f"the interleaved run failed: {res}")
    rows = [{"loss": args.loss, "provider": p, "B": batches[0], "D": dims[0], "dtype": dtype,
             "device": args.device, "status": "ok", "interleaved_rounds": args.interleave, **r}
            for p, r in res["providers"].items()]
    print_table(rows, ["provider", "path", "B", "D", "dtype", "min_ms", "median_ms"],
                title=f"{args.loss} loss, fwd+bwd, {args.device}, steps interleaved in one process")
    first = rows[0]
    for r in rows[1:]:
        print(f"{first['provider']} speed / {r['provider']} speed: {r['min_ms'] / first['min_ms']:.3f} "
              f"(min), {r['median_ms'] / first['median_ms']:.3f} (median)")
    # Its own bench name: report.py's loss section reads the per-point JSON, not this one.
    payload = {"bench": "loss_throughput_interleaved", "machine": machine_description(), "loss": args.loss,
               "flops": {p: PROVIDERS[args.loss][p].convention for p in providers}, "rows": rows}
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
