"""Forward+backward throughput and peak memory of the contrastive losses, fused against materialised.

For every (loss, provider, B, D) point, run in its own subprocess: median fwd+bwd time, achieved
TFLOP/s (fused CLIP: 8*B^2*D; materialised: 6*B^2*D), peak memory (CUDA: max allocated; CPU: peak
RSS, absolute and above the process's baseline once the inputs exist, so the loss's own memory is
visible) and "OOM" instead of a crash.

Providers are kept per loss in :data:`PROVIDERS` (``--loss clip``, ``--loss siglip``).
CLIP providers: ``fused`` (automatic dispatch: Triton on CUDA, C++ on CPU), ``fused-torch`` (the
chunked pure-torch backend), ``materialised`` (OpenCLIP's ClipLoss as OpenCLIP computes it, inline
below) and ``materialised-compiled`` (torch.compile of it). SigLIP has the same four providers around
``siglip_loss`` and OpenCLIP's ``SigLipLoss``; its fused backward recomputes the logit tile once,
so it counts 8*B^2*D FLOPs (forward 2, recompute 2, two gradient GEMMs 4), materialised 6*B^2*D.

Default sweeps (``--batch`` / ``--providers`` / ``--dim`` replace them; given flags run their full
product, e.g. ``--providers fused-torch --batch 1048576`` runs the chunked torch backend there):

- CUDA (bf16, D=1024): ``fused``, ``materialised`` and ``materialised-compiled`` at B in {8192, 65536}
  (the materialised B x B matrices fit an 80+ GB GPU there), then ``fused`` alone at B = 2^20.
  Children share Triton's on-disk autotune cache (``TRITON_CACHE_AUTOTUNING=1`` unless set), so a
  shape is tuned once per machine instead of once per subprocess.
- CPU (fp32, D=512): every provider at B in {1024, 4096, 16384}, compiled only up to 4096.

Each fused row's ``backend`` is what the op recorded it ran on (never a prediction).

Examples::

    python bench/loss_throughput.py --quick
    python bench/loss_throughput.py                      # CPU: B up to 16384, D=512, then the target point
    python bench/loss_throughput.py --device cuda        # CUDA: the default sweep above
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def openclip_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """OpenCLIP ``ClipLoss.forward`` for one process, as OpenCLIP computes it (two B x B matmuls)."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _fused_clip(backend: str | None) -> LossFn:
    from llm2clip_fast.ops.clip_loss import clip_loss

    return lambda img, txt, scale: clip_loss(img, txt, scale, backend=backend)


def _compiled_openclip() -> LossFn:
    return torch.compile(openclip_clip_loss, dynamic=False)


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


def _with_bias(loss_fn: Callable[..., torch.Tensor]) -> LossFn:
    """A SigLIP loss as a LossFn: the learnable bias (a leaf with a gradient) is created on first use."""
    biases: dict[torch.device, torch.Tensor] = {}

    def fn(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if img.device not in biases:
            biases[img.device] = torch.tensor(-10.0, device=img.device, requires_grad=True)
        return loss_fn(img, txt, scale, biases[img.device])

    return fn


def _fused_siglip(backend: str | None) -> LossFn:
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    return _with_bias(lambda img, txt, scale, bias: siglip_loss(img, txt, scale, bias, backend=backend))


@dataclass(frozen=True)
class Provider:
    """One way of computing a loss: how to build it and how many FLOPs a fwd+bwd counts."""

    build: Callable[[], LossFn]
    flops: Callable[[int, int], float]
    note: str


def _fused_flops(b: int, d: int) -> float:
    return 8.0 * b * b * d


def _materialised_flops(b: int, d: int) -> float:
    # The convention of the issue: one logit GEMM forward, two backward. OpenCLIP's code runs a
    # second (transposed) logit GEMM and its backward, so it executes about 12*B^2*D.
    return 6.0 * b * b * d


PROVIDERS: dict[str, dict[str, Provider]] = {
    "clip": {
        "fused": Provider(
            lambda: _fused_clip(None), _fused_flops, "llm2clip_fast clip_loss, automatic backend"
        ),
        "fused-torch": Provider(lambda: _fused_clip("torch"), _fused_flops, "chunked pure-torch backend"),
        "materialised": Provider(lambda: openclip_clip_loss, _materialised_flops, "OpenCLIP ClipLoss, eager"),
        "materialised-compiled": Provider(
            _compiled_openclip, _materialised_flops, "torch.compile(OpenCLIP loss)"
        ),
    },
    "siglip": {
        "fused": Provider(
            lambda: _fused_siglip(None), _fused_flops, "llm2clip_fast siglip_loss, automatic backend"
        ),
        "fused-torch": Provider(lambda: _fused_siglip("torch"), _fused_flops, "chunked pure-torch backend"),
        "materialised": Provider(
            lambda: _with_bias(openclip_siglip_loss), _materialised_flops, "OpenCLIP SigLipLoss, eager"
        ),
        "materialised-compiled": Provider(
            lambda: _with_bias(torch.compile(openclip_siglip_loss, dynamic=False)),
            _materialised_flops,
            "torch.compile(OpenCLIP SigLIP loss)",
        ),
    },
}


def point(
    loss: str, provider: str, batch: int, dim: int, device: str, dtype: str, budget_s: float
) -> dict[str, Any]:
    """One measurement (runs in a fresh subprocess, see bench._common.run_point_in_subprocess)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    prov = PROVIDERS[loss][provider]
    fn = prov.build()
    dt = DTYPES[dtype]
    img = F.normalize(torch.randn(batch, dim, device=dev), dim=-1).to(dt).requires_grad_()
    txt = F.normalize(torch.randn(batch, dim, device=dev), dim=-1).to(dt).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)

    def step() -> None:
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale).backward()

    from llm2clip_fast.ops import _backend

    _backend.clear_selections()
    step()  # warm-up (and torch.compile's compilation) outside the measurement
    img.grad = txt.grad = scale.grad = None  # the gradients count as the loss's own memory
    if dev.type == "cuda":
        torch.cuda.synchronize()
    mark_memory_baseline()
    out: dict[str, Any] = {}
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(step, dev)
        out.update(peak_mb=peak, peak_above_baseline_mb=peak - before)
    timing = time_fn(step, device=dev, warmup=0, budget_s=budget_s, max_reps=20)
    out.update(
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        reps=timing.reps,
        tflops=tflops(prov.flops(batch, dim), timing.median_ms),
    )
    if provider.startswith("fused"):  # which backend served, so a row is never ambiguous
        out["backend"] = _backend.last_selected(f"{loss}_loss")
        if out["backend"] == "cpu" and loss == "clip":  # the epilogue build that ran (LLM2CLIP_CPU_ISA)
            from llm2clip_fast import _C

            out["cpu_isa"] = _C.clip_epilogue_isa()
    return out


def run_point(
    loss: str, provider: str, batch: int, dim: int, device: str, dtype: str, budget_s: float,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    kwargs = {
        "loss": loss,
        "provider": provider,
        "batch": batch,
        "dim": dim,
        "device": device,
        "dtype": dtype,
        "budget_s": budget_s,
    }
    # Triton reads TRITON_CACHE_AUTOTUNING when a kernel module is imported: with it, the first
    # child tunes a shape and later children load the winner from Triton's cache directory.
    env = {"TRITON_CACHE_AUTOTUNING": os.environ.get("TRITON_CACHE_AUTOTUNING", "1")}
    res = run_point_in_subprocess("bench.loss_throughput:point", kwargs, timeout_s=timeout_s, env=env)
    row = {"loss": loss, "provider": provider, "B": batch, "D": dim, "dtype": dtype, "device": device, **res}
    if device == "cpu" and "peak_rss_mb" in res:
        row["peak_mb"] = res["peak_rss_mb"]
    return row


CUDA_FUSED_ONLY_B = 1 << 20


def _default_sweep(device: str, quick: bool) -> tuple[list[int], list[int], str]:
    if quick:
        return [64], [32], "fp32" if device == "cpu" else "bf16"
    if device == "cuda":
        return [8192, 65536, CUDA_FUSED_ONLY_B], [1024], "bf16"
    return [1024, 4096, 16384], [512], "fp32"


def default_providers_at(device: str, b: int, providers: list[str], quick: bool) -> list[str]:
    """The default providers at batch ``b`` (used only when ``--providers`` is not given)."""
    if device == "cuda":
        # The chunked torch backend at large B takes minutes per point: on request only. Past 65536
        # the materialised B x B matrices (and their gradients) no longer fit one GPU.
        wanted = ["fused"] if b >= CUDA_FUSED_ONLY_B else ["fused", "materialised", "materialised-compiled"]
        return [p for p in providers if p in wanted]
    # torch.compile's CPU code generation takes minutes on 2 cores: by default it is compared only at
    # small B on CPU, and not at all in a quick run there, which also leaves out the chunked torch
    # backend (a quick run starts as few processes as it can).
    if quick:
        return [p for p in providers if p in ("fused", "materialised")]
    limit = 4096
    return [p for p in providers if p != "materialised-compiled" or b <= limit]


def _target_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The CPU target: fused (C++) within 1.3x of materialised time, <= 1/20 of its memory above baseline."""
    fused = next((r for r in rows if r["provider"] == "fused" and r.get("status") == "ok"), None)
    mat = next((r for r in rows if r["provider"] == "materialised" and r.get("status") == "ok"), None)
    if fused is None or mat is None:
        return None
    time_ratio = fused["median_ms"] / mat["median_ms"]
    mem_ratio = fused["peak_above_baseline_mb"] / max(mat["peak_above_baseline_mb"], 1e-9)
    return {
        "B": fused["B"],
        "D": fused["D"],
        "dtype": fused["dtype"],
        "fused_backend": fused.get("backend"),
        "time_ratio_fused_over_materialised": time_ratio,
        "time_target": 1.3,
        "time_ok": time_ratio <= 1.3,
        "memory_ratio_fused_over_materialised": mem_ratio,
        "memory_target": 1 / 20,
        "memory_ok": mem_ratio <= 1 / 20,
    }


COLUMNS = [
    "loss",
    "provider",
    "backend",
    "B",
    "D",
    "dtype",
    "status",
    "median_ms",
    "tflops",
    "peak_mb",
    "peak_above_baseline_mb",
]


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
    parser.add_argument(
        "--no-target", action="store_true", help="skip the CPU target point (fp32, B=16384, D=512)"
    )
    args = parser.parse_args(argv)

    table = PROVIDERS[args.loss]
    providers = args.providers or list(table)
    unknown = [p for p in providers if p not in table]
    if unknown:
        parser.error(f"--providers: unknown {unknown}; {args.loss} has {list(table)}")
    batches, dims, dtype = _default_sweep(args.device, args.quick)
    batches, dims, dtype = args.batch or batches, args.dim or dims, args.dtype or dtype
    budget = args.budget_s if args.budget_s is not None else (0.05 if args.quick else 2.0)

    def providers_at(b: int) -> list[str]:
        if args.providers is not None:
            return providers
        return default_providers_at(args.device, b, providers, args.quick)

    rows: list[dict[str, Any]] = []
    for d in dims:
        for b in batches:
            for p in providers_at(b):
                rows.append(run_point(args.loss, p, b, d, args.device, dtype, budget))
                print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS, title=f"{args.loss} loss, fwd+bwd, {args.device}")

    target = None
    if args.device == "cpu" and args.loss == "clip" and not args.quick and not args.no_target:
        target_rows = []
        for p in ("fused", "materialised"):
            done = [r for r in rows if (r["provider"], r["B"], r["D"], r["dtype"]) == (p, 16384, 512, "fp32")]
            target_rows.append(done[0] if done else run_point("clip", p, 16384, 512, "cpu", "fp32", budget))
        print_table(target_rows, COLUMNS, title="CPU target point: fp32, B=16384, D=512")
        target = _target_summary(target_rows)
        rows += [{**r, "target_point": True} for r in target_rows if r not in rows]
        print(target)

    payload = {
        "machine": machine_description(),
        "matmul_tflops": measured_matmul_tflops(args.device, DTYPES[dtype]),
        "loss": args.loss,
        "flops_convention": {
            "fused": "8*B^2*D",
            "materialised": "6*B^2*D" + (" (OpenCLIP executes ~12*B^2*D)" if args.loss == "clip" else ""),
        },
        "providers": {p: table[p].note for p in providers},
        "rows": rows,
        "cpu_target": target,
    }
    path = write_json(args.out, payload)
    print(f"matmul roofline: {payload['matmul_tflops']:.3g} TFLOP/s ({dtype}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
