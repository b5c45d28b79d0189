"""Text adapter throughput and activation memory: fused TextAdapter vs eager and torch.compile reference.

    python bench/adapter_throughput.py            # GPU: batch 4096 and 32768, 4096 -> 1280, bf16 autocast
    python bench/adapter_throughput.py --quick    # a smoke run
    python bench/adapter_throughput.py --device cpu

Implementations (same weights):
- ``fused``: :class:`TextAdapter` forced to the fused Triton kernels on CUDA (a forced backend that
  cannot serve raises, so a missing kernel module fails the point instead of timing the torch path);
  on CPU it uses automatic dispatch, which is the torch path (the fused kernels are GPU-only), so there
  it measures the dispatch overhead only. Each row's ``backend`` is what the op recorded it ran on.
- ``recompute``: :class:`TextAdapter` forced to the ``recompute`` backend (torch ops, per-block
  activation checkpointing): the fused path's saved-activation profile at cuBLAS speed.
- ``eager``: :class:`TextAdapterReference` (nn.LayerNorm / nn.Linear / nn.GELU).
- ``compile``: ``torch.compile(TextAdapterReference)``.

Each point runs in a fresh process. Reported: forward time (inference, no autograd graph), forward +
backward time, model TFLOP/s and their share of this machine's measured matmul rate, the activation
memory of one training step (CUDA: peak allocated during forward+backward minus what was allocated
before: weights, their gradients and the input; CPU: peak RSS above the same baseline), and the bytes
the autograd graph holds after forward (``saved_tensors_hooks``; not for compile).
FLOPs counted: forward ``2*B*(blocks*2*d*h + d*out)``, forward+backward three times that; the fused
backward recomputes the first GEMM of each block (one more ``2*B*d*h`` per block), recompute both GEMMs
of each block: neither is credited.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("fused", "recompute", "eager", "compile")


def adapter_flops(batch: int, dim: int, out_dim: int, num_blocks: int, expansion: int) -> int:
    """Forward GEMM FLOPs of the adapter (the LayerNorm/GELU/residual work is negligible next to it)."""
    return 2 * batch * (num_blocks * 2 * dim * expansion * dim + dim * out_dim)


def _saved_activation_mb(model: torch.nn.Module, run) -> float:
    """MiB of distinct non-parameter storages the autograd graph saves during ``run()``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values()) / 2**20


def point(impl: str, batch: int, dim: int, out_dim: int, num_blocks: int, expansion: int, device: str,
          dtype: str, budget_s: float, fused_backend: str | None = None) -> dict:
    """One benchmark point (runs in its own process).

    ``fused_backend``: the backend forced on the fused impl; default "triton" on CUDA, automatic on CPU
    (bench/gpu_check.py --quick forces "triton" there, to run the kernels under the interpreter).
    """
    from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference
    from llm2clip_fast.ops import _backend

    dev = torch.device(device)
    torch.manual_seed(0)
    if impl == "fused":
        model = TextAdapter(dim, out_dim, num_blocks=num_blocks, expansion=expansion,
                            backend=fused_backend or ("triton" if dev.type == "cuda" else None)).to(dev)
    elif impl == "recompute":
        model = TextAdapter(dim, out_dim, num_blocks=num_blocks, expansion=expansion,
                            backend="recompute").to(dev)
    else:
        model = TextAdapterReference(dim, out_dim, num_blocks=num_blocks, expansion=expansion).to(dev)
    low = DTYPES[dtype]
    if low != torch.float32 and dev.type == "cpu":
        model = model.to(low)  # CPU: low-precision weights (CPU autocast would keep LayerNorm in fp32 too)
    runner = torch.compile(model) if impl == "compile" else model
    x = torch.randn(batch, dim, device=dev)
    use_autocast = dev.type == "cuda" and low != torch.float32
    amp = (lambda: torch.autocast("cuda", dtype=low)) if use_autocast else contextlib.nullcontext
    out_dtype = low
    gy = torch.randn(batch, out_dim, device=dev, dtype=out_dtype)

    def fwd():
        with torch.no_grad(), amp():
            return runner(x)

    def fwd_bwd():
        with amp():
            y = runner(x)
        y.backward(gy)

    _backend.clear_selections()
    fwd_bwd()  # compiles, autotunes, allocates .grad so later steps reuse it
    fwd()
    t_f = time_fn(fwd, device=dev, budget_s=budget_s)
    t_fb = time_fn(fwd_bwd, device=dev, budget_s=budget_s)
    result = {"fwd_ms": t_f.median_ms, "fwdbwd_ms": t_fb.median_ms}
    if impl != "compile":
        def graph():
            with amp():
                return runner(x)
        result["saved_mb"] = _saved_activation_mb(model, graph)
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(fwd_bwd, dev)
        result["act_peak_mb"] = peak - before
    else:
        mark_memory_baseline()
        fwd_bwd()  # the parent reads peak_above_baseline_mb
    # What the op recorded it ran on; the reference modules never call it (plain nn.Module code).
    result["backend"] = (_backend.last_selected("text_adapter") if impl in ("fused", "recompute")
                         else "torch (nn.Module)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/adapter_throughput.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="GPU: autocast dtype (default bf16); CPU: weights dtype (default fp32)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated subset of " + ",".join(IMPLS) + " (default: all; a quick "
                        "CPU run leaves out compile, whose code generation takes minutes on 2 cores)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--dims", default=None, help="comma-separated input dims (d)")
    parser.add_argument("--out-dim", type=int, default=None)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--expansion", type=int, default=2)
    args = parser.parse_args(argv)

    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    if on_gpu:
        batches, dims, out_dim = ([4096] if args.quick else [4096, 32768]), [4096], 1280
    else:
        batches = [32] if args.quick else [256, 1024]
        dims, out_dim = ([64] if args.quick else [256, 512]), (32 if args.quick else 128)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    dims = [int(d) for d in args.dims.split(",")] if args.dims else dims
    out_dim = args.out_dim or out_dim
    default_impls = [i for i in IMPLS if not (args.quick and not on_gpu and i == "compile")]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()] if args.impls else default_impls
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        parser.error(f"--impls: unknown {bad}; choose from {list(IMPLS)}")
    budget_s = 0.05 if args.quick else 2.0

    matmul = measured_matmul_tflops(dev, DTYPES[dtype])
    print(f"measured {dtype} matmul rate on {dev.type}: {matmul:.3g} TFLOP/s", flush=True)
    rows = []
    for d in dims:
        for b in batches:
            fl = adapter_flops(b, d, out_dim, args.num_blocks, args.expansion)
            eager_fb = None
            for impl in impls:
                r = run_point_in_subprocess(
                    "bench.adapter_throughput:point",
                    {"impl": impl, "batch": b, "dim": d, "out_dim": out_dim, "num_blocks": args.num_blocks,
                     "expansion": args.expansion, "device": str(dev), "dtype": dtype, "budget_s": budget_s},
                    timeout_s=1800,
                )
                row = {"impl": impl, "batch": b, "dim": d, "out": out_dim, "status": r.get("status")}
                if r.get("status") == "ok":
                    row.update({k: r.get(k) for k in ("backend", "fwd_ms", "fwdbwd_ms", "saved_mb")})
                    row["act_peak_mb"] = r.get("act_peak_mb", r.get("peak_above_baseline_mb"))
                    row["fwd_tflops"] = tflops(fl, r["fwd_ms"])
                    row["fwdbwd_tflops"] = tflops(3 * fl, r["fwdbwd_ms"])
                    row["pct_matmul"] = 100 * row["fwdbwd_tflops"] / matmul
                    if impl == "eager":
                        eager_fb = r["fwdbwd_ms"]
                else:
                    row["error"] = str(r.get("error", ""))[-300:]
                    print(f"  {impl} b={b} d={d}: {row['status']}: {row['error']}", flush=True)
                rows.append(row)
            for row in rows:
                if row["batch"] == b and row["dim"] == d and eager_fb and row.get("fwdbwd_ms"):
                    row["speedup_vs_eager"] = eager_fb / row["fwdbwd_ms"]
    cols = ["impl", "backend", "batch", "dim", "out", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops",
            "pct_matmul", "speedup_vs_eager", "act_peak_mb", "saved_mb", "status"]
    title = (f"text adapter, {args.num_blocks} blocks x{args.expansion}, {dtype}, {dev.type} "
             f"(matmul {matmul:.3g} TFLOP/s; fwd+bwd TFLOP/s count 3x forward GEMM FLOPs)")
    print_table(rows, cols, title=title)
    path = write_json(args.out, {
        "bench": "adapter_throughput", "device": dev.type, "dtype": dtype, "matmul_tflops": matmul,
        "num_blocks": args.num_blocks, "expansion": args.expansion, "machine": machine_description(),
        "rows": rows,
    })
    print(f"wrote {path}")
    return 0



def gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The ``adapter`` stage of bench/gpu_check.py: (name, run) pairs in priority order, each ``run()``
    returning one result's flat metrics (optional ``status``/``note``).

    4096 -> 1280, 4 blocks x2, bf16 autocast on CUDA: fused, recompute and eager at batch 8192 and
    32768, torch.compile last (its compilation is the dearest). Quick (CPU, interpreter): tiny sizes,
    no compile.
    """
    on_gpu = device.type == "cuda"
    d, n, blocks = (4096, 1280, 4) if on_gpu else (32, 16, 1)
    batches = (8192, 32768) if on_gpu else (9,)
    order = [(impl, b) for impl in ("fused", "recompute", "eager") for b in batches]
    if not quick:
        order += [("compile", b) for b in batches]
    fwdbwd: dict[tuple[str, int], float] = {}

    def run(impl: str, b: int) -> dict:
        r = point(impl=impl, batch=b, dim=d, out_dim=n, num_blocks=blocks, expansion=2, device=str(device),
                  dtype="bf16" if on_gpu else "fp32", budget_s=0.2 if quick else 1.0, fused_backend="triton")
        fwdbwd[(impl, b)] = r["fwdbwd_ms"]
        r["fwdbwd_tflops"] = 3 * adapter_flops(b, d, n, blocks, 2) / r["fwdbwd_ms"] / 1e9
        r["blocks"] = blocks
        if ("eager", b) in fwdbwd and impl != "eager":
            r["speedup_vs_eager"] = fwdbwd[("eager", b)] / r["fwdbwd_ms"]
        if impl == "eager" and ("fused", b) in fwdbwd:
            r["fused_speedup_vs_eager"] = r["fwdbwd_ms"] / fwdbwd[("fused", b)]
        r.pop("peak_above_baseline_mb", None)
        return r

    return [(f"adapter {impl} B={b} {d}->{n}", functools.partial(run, impl, b)) for impl, b in order]


if __name__ == "__main__":
    sys.exit(main())
