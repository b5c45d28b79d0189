"""Text adapter: time, saved activations, peak memory and fidelity of every backend, in one run.

    python bench/adapter_throughput.py                 # CPU: B=4096, 1024 -> 512, bf16 autocast
    python bench/adapter_throughput.py --quick         # a smoke run
    python bench/adapter_throughput.py --device cuda   # B=8192 and 32768, 4096 -> 1280, bf16 autocast

Implementations (same weights; 4 blocks x2 unless told otherwise):
- ``lean``: :class:`TextAdapter` forced to the lean autograd Functions: ``triton`` on CUDA (cuBLAS
  products, Triton LayerNorm/GELU/dropout kernels), ``lean`` on the CPU (oneDNN products, the C++ row
  kernels of ``llm2clip_fast._C``). Each row's ``backend`` is what the op recorded it ran on.
- ``recompute``: :class:`TextAdapter` forced to per-block activation checkpointing.
- ``eager``: :class:`TextAdapterReference` (nn.LayerNorm / nn.Linear / nn.GELU): what a user writes.
- ``compile``: ``torch.compile(TextAdapterReference)`` (Inductor): the best plain-torch code.

Each point runs in a fresh process. Reported: forward time (inference), forward + backward time, model
TFLOP/s and their share of this machine's measured matmul rate; ``saved_mb``, the bytes the autograd
graph holds after forward (distinct non-parameter storages, ``saved_tensors_hooks``; not for compile)
and its ratio to eager's; the activation memory of one training step (CUDA: peak allocated above the
weights, gradients and input; CPU: peak RSS above the same baseline); and fidelity: the relative error
(norm) of the output and of the worst gradient against a float64 evaluation of the same weights on the
first ``FIDELITY_ROWS`` rows, next to eager's own error in the same precision (``err_vs_eager``: the
worst ratio of the two, which the tests hold at <= 2).
FLOPs counted: forward ``2*B*(blocks*2*d*h + d*out)``, forward+backward three times that; recomputation
(recompute's second forward) is not credited.

``run_gpu_stage(budget_s, out_dir)`` runs the GPU plan alone and writes ``adapter_gpu.json``;
bench/gpu_check.py's ``adapter`` stage runs the same cases through :func:`gpu_check_points`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

from bench._common import (
    add_common_args,
    cuda_peak_mb,
    machine_description,
    mark_memory_baseline,
    measured_matmul_tflops,
    print_table,
    run_cases_within_budget,
    run_point_in_subprocess,
    tflops,
    time_fn,
    write_json,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("lean", "recompute", "eager", "compile")
FIDELITY_ROWS = 256


def adapter_flops(batch: int, dim: int, out_dim: int, num_blocks: int, expansion: int) -> int:
    """Forward GEMM FLOPs of the adapter (the LayerNorm/GELU/residual work is negligible next to it)."""
    return 2 * batch * (num_blocks * 2 * dim * expansion * dim + dim * out_dim)


def saved_activation_mb(model: torch.nn.Module, run: Callable[[], Any]) -> float:
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


def _build(impl: str, dim: int, out_dim: int, num_blocks: int, expansion: int, dev: torch.device,
           lean_backend: str | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to run, the nn.Module holding its parameters), seeded alike for every impl."""
    from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference

    torch.manual_seed(0)
    ref = TextAdapterReference(dim, out_dim, num_blocks=num_blocks, expansion=expansion)
    with torch.no_grad():  # non-trivial LayerNorm affines, as after training
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref = ref.to(dev)
    if impl in ("lean", "recompute"):
        backend = "recompute" if impl == "recompute" else lean_backend or (
            "triton" if dev.type == "cuda" else "lean")
        model = TextAdapter(dim, out_dim, num_blocks=num_blocks, expansion=expansion, backend=backend).to(dev)
        model.load_state_dict(ref.state_dict())
        return model, model
    if impl == "compile":
        return torch.compile(ref), ref
    return ref, ref


def _autocast(dev: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(dev.type, dtype=dtype)


def fidelity(model: torch.nn.Module, params: torch.nn.Module, dev: torch.device, dtype: torch.dtype,
             dim: int, out_dim: int, num_blocks: int, expansion: int, rows: int = FIDELITY_ROWS) -> dict:
    """Relative errors (norm) of output and gradients against float64, for ``model`` and for eager
    in the same precision; ``err_vs_eager`` is the worst ratio of the two (the tests keep it <= 2)."""
    from llm2clip_fast.models.text_adapter import TextAdapterReference

    ref64 = TextAdapterReference(dim, out_dim, num_blocks=num_blocks, expansion=expansion)
    ref64 = ref64.to(dev, torch.float64)
    ref64.load_state_dict(params.state_dict())
    eager = TextAdapterReference(dim, out_dim, num_blocks=num_blocks, expansion=expansion).to(dev)
    eager.load_state_dict(params.state_dict())
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(rows, dim, generator=g) + 0.3).to(dev)
    gy = torch.randn(rows, out_dim, generator=g).to(dev)
    amp = _autocast(dev, dtype)

    def run(m: torch.nn.Module, p: torch.nn.Module, x_in: torch.Tensor, low: bool) -> list[torch.Tensor]:
        x_in = x_in.detach().requires_grad_()
        with amp() if low else contextlib.nullcontext():
            y = m(x_in)
        grads = torch.autograd.grad(y, [x_in, *p.parameters()], gy.to(y.dtype))
        return [y.detach().double(), *(t.double() for t in grads)]

    want = run(ref64, ref64, x.double(), False)
    got, base = run(model, params, x, True), run(eager, eager, x, True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    errs = [rel(a, w) for a, w in zip(got, want)]
    eager_errs = [rel(a, w) for a, w in zip(base, want)]
    ratios = [e / max(b, 1e-12) for e, b in zip(errs, eager_errs)]
    return {"out_err": errs[0], "eager_out_err": eager_errs[0], "grad_err": max(errs[1:]),
            "eager_grad_err": max(eager_errs[1:]), "err_vs_eager": max(ratios)}


def point(impl: str, batch: int, dim: int, out_dim: int, num_blocks: int, expansion: int, device: str,
          dtype: str, budget_s: float, lean_backend: str | None = None, with_fidelity: bool = True) -> dict:
    """One benchmark point (``run_point_in_subprocess`` runs it in its own process).

    ``dtype``: the autocast dtype ("fp32": none). ``lean_backend``: the backend forced on the lean impl
    (default "triton" on CUDA, "lean" on the CPU; bench/gpu_check.py --quick forces "triton" on the
    CPU, where the Triton interpreter runs the kernels).
    """
    from llm2clip_fast.ops import _backend

    dev = torch.device(device)
    low = DTYPES[dtype]
    model, params = _build(impl, dim, out_dim, num_blocks, expansion, dev, lean_backend)
    x = torch.randn(batch, dim, device=dev)
    amp = _autocast(dev, low)
    gy = torch.randn(batch, out_dim, device=dev, dtype=low)

    def fwd():
        with torch.no_grad(), amp():
            return model(x)

    def fwd_bwd():
        with amp():
            y = model(x)
        y.backward(gy)

    _backend.clear_selections()
    fwd_bwd()  # compiles, autotunes, allocates .grad so later steps reuse it
    fwd()
    t_f = time_fn(fwd, device=dev, budget_s=budget_s)
    t_fb = time_fn(fwd_bwd, device=dev, budget_s=budget_s)
    result: dict[str, Any] = {"fwd_ms": t_f.median_ms, "fwdbwd_ms": t_fb.median_ms}
    # What the op recorded it ran on; the reference modules never call it (plain nn.Module code).
    result["backend"] = _backend.last_selected("text_adapter") if impl in ("lean", "recompute") else (
        "torch (nn.Module)" if impl == "eager" else "inductor (nn.Module)")
    if impl != "compile":
        def graph():
            with amp():
                return model(x)
        result["saved_mb"] = saved_activation_mb(params, graph)
    if with_fidelity:
        result.update(fidelity(model, params, dev, low, dim, out_dim, num_blocks, expansion,
                               rows=min(batch, FIDELITY_ROWS)))
    if dev.type == "cuda":
        peak, before = cuda_peak_mb(fwd_bwd, dev)
        result["act_peak_mb"] = peak - before
    else:
        mark_memory_baseline()
        fwd_bwd()  # the parent reads peak_above_baseline_mb
    return result


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Adds speedup_vs_eager and saved_vs_eager to every row of a (batch, dim) point that eager measured."""
    for row in rows:
        eager = next((r for r in rows if r["impl"] == "eager" and r["batch"] == row["batch"]
                      and r["dim"] == row["dim"] and r.get("fwdbwd_ms")), None)
        if eager and row.get("fwdbwd_ms"):
            row["speedup_vs_eager"] = eager["fwdbwd_ms"] / row["fwdbwd_ms"]
            if row.get("saved_mb") is not None and eager.get("saved_mb"):
                row["saved_vs_eager"] = row["saved_mb"] / eager["saved_mb"]
    return rows


# ------------------------------------------------------------------------------------------------
# The GPU plan: gpu_check.py's adapter stage calls these (gpu_check_points); run_gpu_stage runs them alone.

GPU_BATCHES = (8192, 32768)
GPU_DIM, GPU_OUT = 4096, 1280


def gpu_speed_cases(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """(name, measure) for every impl at B = 8192 and 32768, 4096 -> 1280 (bf16 autocast), compile last.

    ``quick``: tiny sizes on the CPU with the Triton kernels under the interpreter (the same code)."""
    batches, dim, out, blocks = ((9,), 32, 16, 1) if quick else (GPU_BATCHES, GPU_DIM, GPU_OUT, 4)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    order = [(impl, b) for impl in ("lean", "eager", "recompute") for b in batches]
    if not quick:
        order += [("compile", b) for b in batches]  # dearest last: compilation
    results: dict[tuple[str, int], dict] = {}
    cases = []
    for impl, b in order:
        def run(impl: str = impl, b: int = b) -> dict:
            r = point(impl=impl, batch=b, dim=dim, out_dim=out, num_blocks=blocks, expansion=2,
                      device=str(device), dtype=dtype, budget_s=0.2 if quick else 1.0, lean_backend="triton",
                      with_fidelity=b == batches[0])
            r["fwdbwd_tflops"] = 3 * adapter_flops(b, dim, out, blocks, 2) / r["fwdbwd_ms"] / 1e9
            results[(impl, b)] = r
            eager = results.get(("eager", b))
            if eager and impl != "eager":
                r["speedup_vs_eager"] = eager["fwdbwd_ms"] / r["fwdbwd_ms"]
                if r.get("saved_mb") is not None:
                    r["saved_vs_eager"] = r["saved_mb"] / eager["saved_mb"]
            return r

        cases.append((f"adapter {impl} B={b} {dim}->{out}", run))
    return cases


def gpu_kernel_cases(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """(name, measure) for each Triton element-wise kernel of the lean adapter against the torch ops a
    user would write for the same thing, at one block's shapes (B=8192, d=4096, h=8192)."""
    import torch.nn.functional as F
    from llm2clip_fast.kernels import adapter as K

    b, d = (9, 32) if quick else (GPU_BATCHES[0], GPU_DIM)
    h = 2 * d
    cd = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(7)

    def rnd(*shape: int, dtype: torch.dtype = cd) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, dres = rnd(b, d, dtype=torch.float32), rnd(b, d, dtype=torch.float32)
    gamma, beta = 1 + 0.1 * rnd(d, dtype=torch.float32), 0.1 * rnd(d, dtype=torch.float32)
    z, dh, dln = rnd(b, h), rnd(b, h), rnd(b, d)
    seed = torch.tensor([3], device=device)
    xhat, rstd, _ = K.layer_norm_fwd(x, gamma, beta, 1e-5, cd)
    xr = x.clone().requires_grad_()

    def torch_ln_bwd() -> Any:
        y = F.layer_norm(xr, (d,), gamma, beta, 1e-5)
        return torch.autograd.grad(y, (xr,), dln.float())[0] + dres

    def torch_gelu_dropout() -> Any:
        return F.dropout(F.gelu(z), 0.1, training=True)

    cases_spec = [
        ("LayerNorm forward (xhat, a, rstd)", lambda: K.layer_norm_fwd(x, gamma, beta, 1e-5, cd),
         lambda: F.layer_norm(x, (d,), gamma, beta, 1e-5).to(cd)),
        ("LayerNorm backward + residual (+ a, bias sums)",
         lambda: K.layer_norm_bwd(xhat, rstd, gamma, beta, dln, dres, torch.float32), torch_ln_bwd),
        ("GELU + dropout forward", lambda: K.gelu_dropout_fwd(z, seed, 0.1), torch_gelu_dropout),
        ("GELU + dropout backward (+ h)", lambda: K.gelu_dropout_bwd(z, dh, seed, 0.1),
         lambda: torch.ops.aten.gelu_backward(dh, z)),
    ]
    cases = []
    for name, fused, ref in cases_spec:
        def run(fused: Callable[[], Any] = fused, ref: Callable[[], Any] = ref) -> dict:
            t_fused = time_fn(fused, device=device, budget_s=0.05 if quick else 0.5).median_ms
            t_ref = time_fn(ref, device=device, budget_s=0.05 if quick else 0.5).median_ms
            return {"triton_ms": t_fused, "torch_ms": t_ref, "triton_over_torch": t_fused / t_ref}

        cases.append((f"{name} B={b} d={d} h={h}", run))
    return cases


def run_gpu_stage(budget_s: float, out_dir: str | Path, quick: bool = False) -> dict:
    """Run :func:`gpu_speed_cases` then :func:`gpu_kernel_cases` until ``budget_s`` is spent; write
    ``out_dir/adapter_gpu.json`` after every case (a run cut short keeps what it measured)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    doc: dict[str, Any] = {"bench": "adapter_gpu", "device": str(device), "quick": quick,
                           "machine": machine_description(), "results": []}
    path = Path(out_dir) / "adapter_gpu.json"
    run_cases_within_budget(gpu_check_points(device, quick), budget_s, path, doc)
    write_json(path, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_out="bench/results/adapter_throughput.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="autocast dtype of the forward (fp32: none); default bf16")
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
    if on_gpu:
        batches, dims, out_dim = ([8192] if args.quick else list(GPU_BATCHES)), [GPU_DIM], GPU_OUT
    else:
        batches, dims, out_dim = ([33] if args.quick else [4096]), ([64] if args.quick else [1024]), (
            32 if args.quick else 512)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    dims = [int(d) for d in args.dims.split(",")] if args.dims else dims
    out_dim = args.out_dim or out_dim
    default_impls = [i for i in IMPLS if not (args.quick and not on_gpu and i == "compile")]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()] if args.impls else default_impls
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        parser.error(f"--impls: unknown {bad}; choose from {list(IMPLS)}")
    budget_s = 0.05 if args.quick else 2.0

    matmul = measured_matmul_tflops(dev, DTYPES[args.dtype])
    print(f"measured {args.dtype} matmul rate on {dev.type}: {matmul:.3g} TFLOP/s", flush=True)
    rows = []
    for d in dims:
        for b in batches:
            fl = adapter_flops(b, d, out_dim, args.num_blocks, args.expansion)
            for impl in impls:
                r = run_point_in_subprocess(
                    "bench.adapter_throughput:point",
                    {"impl": impl, "batch": b, "dim": d, "out_dim": out_dim, "num_blocks": args.num_blocks,
                     "expansion": args.expansion, "device": str(dev), "dtype": args.dtype,
                     "budget_s": budget_s},
                    timeout_s=1800,
                )
                row = {"impl": impl, "batch": b, "dim": d, "out": out_dim, "status": r.get("status")}
                if r.get("status") == "ok":
                    row.update({k: r.get(k) for k in ("backend", "fwd_ms", "fwdbwd_ms", "saved_mb", "out_err",
                                                      "grad_err", "eager_grad_err", "err_vs_eager")})
                    row["act_peak_mb"] = r.get("act_peak_mb", r.get("peak_above_baseline_mb"))
                    row["fwd_tflops"] = tflops(fl, r["fwd_ms"])
                    row["fwdbwd_tflops"] = tflops(3 * fl, r["fwdbwd_ms"])
                    row["pct_matmul"] = 100 * row["fwdbwd_tflops"] / matmul
                else:
                    row["error"] = str(r.get("error", ""))[-300:]
                    print(f"  {impl} b={b} d={d}: {row['status']}: {row['error']}", flush=True)
                rows.append(row)
    _with_ratios(rows)
    cols = ["impl", "backend", "batch", "dim", "out", "fwd_ms", "fwdbwd_ms", "fwdbwd_tflops", "pct_matmul",
            "speedup_vs_eager", "saved_mb", "saved_vs_eager", "act_peak_mb", "grad_err", "err_vs_eager",
            "status"]
    title = (f"text adapter, {args.num_blocks} blocks x{args.expansion}, {args.dtype} autocast, {dev.type} "
             f"(matmul {matmul:.3g} TFLOP/s; fwd+bwd TFLOP/s count 3x forward GEMM FLOPs)")
    print_table(rows, cols, title=title)
    path = write_json(args.out, {
        "bench": "adapter_throughput", "device": dev.type, "dtype": args.dtype, "matmul_tflops": matmul,
        "num_blocks": args.num_blocks, "expansion": args.expansion, "machine": machine_description(),
        "rows": rows,
    })
    print(f"wrote {path}")
    return 0



def gpu_check_points(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    """The ``adapter`` stage of bench/gpu_check.py: :func:`gpu_speed_cases` (lean, eager, recompute, then
    torch.compile, at B = 8192 and 32768, 4096 -> 1280) then :func:`gpu_kernel_cases` (each element-wise
    Triton kernel against the torch ops it replaces), in that priority order."""
    return [*gpu_speed_cases(device, quick), *gpu_kernel_cases(device, quick)]


if __name__ == "__main__":
    sys.exit(main())
