"""Compile every autotune config of the Triton kernels for sm_90a, no GPU needed, and report fit.

``python -m llm2clip_fast.kernels._ptxas_report [--dtypes bf16 fp32] [--kernels adapter_fwd ...]`` prints,
per kernel, operand dtype and config: registers per thread, spill stores/loads (bytes, from
``ptxas -v``), the shared memory Triton allocates, and the estimate that
:mod:`llm2clip_fast.kernels._config_fit` prunes by. Run it with ``TRITON_INTERPRET`` unset (the kernel
modules pick their GPU config lists at import). It is how the config lists were chosen: configs that
spill or exceed sm_90's shared memory were dropped or are pruned per dtype.

Arguments are specialised as the JIT does for typical shapes: pointers and sizes divisible by 16,
unit inner strides as the constant 1 (that is what lets loads vectorise and pipeline).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_SM90 = 90
# Integer arguments that are not strides (sizes divisible by 16 for the report).
_INT_ARGS = {"M", "N", "K", "D", "rows", "cols_per_split", "M_BUCKET", "N_BUCKET", "rows_per_program"}


@dataclass(frozen=True)
class KernelSpec:
    """How to specialise one autotuned kernel: which pointers carry the operand dtype, what is constant."""

    module: str
    name: str
    tiles: str  # the module's TileConfigs for this kernel
    operand_ptrs: tuple[str, ...]  # pointers of the operand dtype; every other pointer is fp32
    unit_strides: tuple[str, ...]  # inner strides (equal to 1, so the JIT makes them constants)
    constexprs: dict


def _specs(dtype: str, fp32_prec: str = "ieee") -> dict[str, KernelSpec]:
    """fp32_prec: "ieee" is torch's default float32 matmul precision ("highest"), "tf32" what
    ``torch.backends.cuda.matmul.allow_tf32`` / precision "high" selects."""
    import triton.language as tl

    dot_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    adapter_prec = fp32_prec if dtype == "fp32" else None
    return {
        "adapter_fwd": KernelSpec(
            "adapter", "_fused_linear_fwd_kernel", "_FWD_TILES", ("A", "W", "RES", "OUT"),
            ("stride_ak", "stride_wk", "stride_rn", "stride_on"),
            {"LN_INPUT": True, "GELU": True, "HAS_RES": True, "RES_L2": False, "DOT_DTYPE": dot_dtype,
             "UPCAST": False, "PRECISION": adapter_prec}),
        "adapter_bwd": KernelSpec(
            "adapter", "_ln_gelu_bwd_kernel", "_BWD_TILES", ("X", "W1", "DY", "W2", "DZ", "H"),
            ("stride_xk", "stride_w1k", "stride_dyk", "stride_w2n", "stride_on"),
            {"DOT_DTYPE": dot_dtype, "UPCAST": False, "PRECISION": adapter_prec}),
        "adapter_wgrad": KernelSpec(
            "adapter", "_weight_grad_kernel", "_WGRAD_TILES", ("G", "X"), ("stride_gn", "stride_xk", "stride_dwk"),
            {"LN_INPUT": True, "HAS_DB": True, "DOT_DTYPE": dot_dtype, "UPCAST": False,
             "PRECISION": adapter_prec}),
    }


@dataclass(frozen=True)
class Fit:
    regs: int
    spill_stores: int
    spill_loads: int
    shared: int


def _ptxas_fit(ptx: str) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(_SM90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def kernel_of(key: str):
    """The autotuned kernel (a ``triton.runtime.Autotuner``) the report calls ``key``."""
    spec = _specs("bf16")[key]
    return getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.name)


def tiles_of(key: str):
    """The kernel's :class:`~llm2clip_fast.kernels._config_fit.TileConfigs`."""
    spec = _specs("bf16")[key]
    return getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.tiles)


def compile_for_sm90(key: str, dtype: str, config, fp32_prec: str = "ieee"):
    """Compile kernel ``key`` (see :func:`_specs`) with ``config`` for sm_90a: a ``CompiledKernel``
    whose ``asm`` holds ttir, ttgir, llir, ptx and cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _specs(dtype, fp32_prec)[key]
    fn = kernel_of(key).fn
    constexprs = {**spec.constexprs, **config.kwargs, **{name: 1 for name in spec.unit_strides}}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("eps"):
            signature[name] = "fp32"
        elif name == "offset":  # any integer
            signature[name] = "i32"
        elif name in _INT_ARGS or name.startswith("stride"):
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = f"*{_DTYPES[dtype]}" if name in spec.operand_ptrs else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", _SM90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def measure(key: str, dtype: str, config, fp32_prec: str = "ieee") -> Fit:
    """Registers and spills (``ptxas -v``) and Triton's shared memory of ``config`` on sm_90a."""
    compiled = compile_for_sm90(key, dtype, config, fp32_prec)
    regs, stores, loads = _ptxas_fit(compiled.asm["ptx"])
    return Fit(regs, stores, loads, int(compiled.metadata.shared))


def main(argv: list[str] | None = None) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels carry one config and cannot compile")
    from ._config_fit import SM90_SHARED_MEMORY_BYTES, estimated_shared_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(_DTYPES), choices=list(_DTYPES))
    parser.add_argument("--kernels", nargs="+", default=None, choices=list(_specs("bf16")), help="default: all")
    parser.add_argument("--fp32-precision", default="ieee", choices=["ieee", "tf32"],
                        help="dot precision of fp32 operands (torch's default is ieee)")
    parser.add_argument("--all", action="store_true",
                        help="every config of the kernel, not only those kept for the dtype")
    args = parser.parse_args(argv)
    print(f"sm_90a, shared-memory budget {SM90_SHARED_MEMORY_BYTES} bytes, fp32 dots {args.fp32_precision}")
    print(f"{'kernel':14} {'dtype':5} {'config':32} {'regs':>4} {'spill st/ld':>12} {'shared':>7} {'estimate':>8}")
    for dtype in args.dtypes:
        for key in _specs(dtype):
            if args.kernels and key not in args.kernels:
                continue
            elem = 4 if dtype == "fp32" else 2
            tiles = tiles_of(key)
            for config in tiles.all() if args.all else tiles.for_elem_size(elem):
                kw = config.kwargs
                label = (f"M{kw['BLOCK_M']} N{kw['BLOCK_N']} K{kw['BLOCK_K']} "
                         f"w{config.num_warps} s{config.num_stages}")
                try:
                    fit = measure(key, dtype, config, args.fp32_precision)
                    result = (f"{fit.regs:4d} {fit.spill_stores:5d}/{fit.spill_loads:<6d} {fit.shared:7d} "
                              f"{estimated_shared_bytes(key, config, elem):8d}")
                except Exception as exc:  # report and go on: one bad config must not hide the rest
                    result = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                print(f"{key:14} {dtype:5} {label:32} {result}", flush=True)


if __name__ == "__main__":
    main()
