"""``python -m llm2clip_fast.info``: versions, built extensions, and which backend serves each op here.

For every registered op and for each device/dtype this machine has, prints the backend automatic
dispatch would pick and, for every other backend, why it would not serve; then the contrastive
losses' memory budget on each device (ops/_chunking.py: where it comes from, how much) and the path a
training call of the CLIP loss would take at a few batch sizes (keep-logits or recompute, rows per chunk).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import pkgutil
import platform
import sys
from typing import Any

import torch

from . import __version__
from ._extensions import cpu_extension, cpu_extension_error, cuda_extension, cuda_extension_error
from .ops import _backend

_PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "webdataset", "safetensors",
             "numpy", "xformers", "flash-attn")


def load_all_ops() -> dict[str, _backend.Op]:
    """Import every op module under llm2clip_fast.ops so each registers its backends."""
    from . import ops

    for mod in pkgutil.iter_modules(ops.__path__):
        if not mod.name.startswith("_") and mod.name != "reference":
            importlib.import_module(f"{ops.__name__}.{mod.name}")
    return _backend.registered_ops()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _clip_epilogue_isa(c: Any) -> str:
    """The CLIP loss epilogue build this process runs (LLM2CLIP_CPU_ISA or the CPU's widest)."""
    try:
        return str(c.clip_epilogue_isa())
    except (AttributeError, RuntimeError) as exc:  # an older _C, or a bad LLM2CLIP_CPU_ISA
        return f"unavailable: {exc}"


def collect() -> dict[str, Any]:
    """Everything ``info`` prints, as a JSON-able dict."""
    versions = {"llm2clip_fast": __version__, "python": platform.python_version()}
    versions.update({p: _version(p) for p in _PACKAGES})
    ext: dict[str, Any] = {}
    c = cpu_extension()
    ext["llm2clip_fast._C"] = (
        {"built": True, "openmp": bool(c.has_openmp()), "omp_threads": int(c.omp_max_threads()),
         "clip_epilogue_isa": _clip_epilogue_isa(c)}
        if c is not None
        else {"built": False, "why": cpu_extension_error()}
    )
    cu = cuda_extension()
    ext["llm2clip_fast._cuda"] = (
        {"built": True, **dict(cu.runtime_info())}
        if cu is not None
        else {"built": False, "why": cuda_extension_error()}
    )
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    table = []
    for name, op in sorted(load_all_ops().items()):
        if op.probe is None:
            continue
        for dev in devices:
            for dtype in (torch.float32, torch.bfloat16):
                tensors = op.probe(dev, dtype)
                rows = _backend.explain(name, tensors)
                chosen = next((b for b, why in rows if not why), None)
                forced = _backend.env_forced_backend(name)
                table.append({
                    "op": name, "device": dev.type, "dtype": str(dtype).replace("torch.", ""),
                    "serves": chosen, "forced_by_env": forced,
                    "refusals": {b: why for b, why in rows if why},
                })
    from .models.attention_kernels import machine_report

    return {
        "versions": versions,
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "extensions": ext,
        "ops": table,
        # Which kernel SDPA runs for a vision tower's attention here (run, not predicted).
        "attention": machine_report(),
        "loss_memory": loss_memory(devices),
    }


LOSS_PLAN_BATCHES = (4096, 16384, 65536)


def loss_memory(devices: list[torch.device]) -> list[dict[str, Any]]:
    """Per device: the losses' memory budget, its source, and the CLIP path of a training call at
    :data:`LOSS_PLAN_BATCHES` (fp32 on CPU, bf16 on CUDA, the backend automatic dispatch picks)."""
    import os

    from .device_memory import free_memory_bytes
    from .ops._chunking import BUDGET_ENV, DEFAULT_BUDGET_FRACTION, memory_budget
    from .ops._overlap import overlap_enabled
    from .ops.clip_loss import OP_NAME, plan_clip_chunks

    rows = []
    for dev in devices:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        probe = _backend.registered_ops()[OP_NAME].probe(dev, dtype)
        backend = next((b for b, why in _backend.explain(OP_NAME, probe) if not why), None)
        env = os.environ.get(BUDGET_ENV, "").strip()
        source = f"{BUDGET_ENV}={env}" if env else f"default: {DEFAULT_BUDGET_FRACTION:g} of the free memory"
        row: dict[str, Any] = {"device": dev.type, "dtype": str(dtype).replace("torch.", ""),
                               "backend": backend, "budget_bytes": memory_budget(dev), "source": source,
                               "free_bytes": free_memory_bytes(dev),
                               "overlap": dev.type == "cuda" and backend == "triton" and overlap_enabled()}
        if backend is not None:
            row["clip_paths"] = {
                str(b): plan_clip_chunks(b, b, dev, dtype, backend, needs_grad=True)._asdict()
                for b in LOSS_PLAN_BATCHES}
        rows.append(row)
    return rows


def render(info: dict[str, Any]) -> str:
    out = ["llm2clip_fast info", "", "versions:"]
    out += [f"  {k:<14} {v if v is not None else '-'}" for k, v in info["versions"].items()]
    out += ["", f"platform: {info['platform']}", f"cuda available: {info['cuda_available']}",
            f"torch threads: {info['torch_threads']}", "", "extensions:"]
    for name, e in info["extensions"].items():
        detail = ", ".join(f"{k}={v}" for k, v in e.items() if k != "built")
        out.append(f"  {name:<22} {'built' if e['built'] else 'NOT built'}  {detail}")
    out += ["", "ops (automatic dispatch):"]
    for row in info["ops"]:
        forced = f"  [env forces {row['forced_by_env']}]" if row["forced_by_env"] else ""
        serves = row["serves"] or "NONE"
        out.append(f"  {row['op']:<18} {row['device']:<5} {row['dtype']:<9} -> {serves}{forced}")
        for b, why in row["refusals"].items():
            out.append(f"      {b:<10} not used: {'; '.join(why)}")
    out += ["", "attention kernels (ViT-L/14-336 call: 16 heads, 577 tokens, head size 64; observed):"]
    for row in info.get("attention", []):
        out.append(f"  sdpa {row['device']:<5} {row['dtype']:<9} -> {row['serves']}")
        for k, why in row["refusals"].items():
            out.append(f"      {k:<10} not used: {'; '.join(why)[:200]}")
    out += ["", "loss memory budget (memory_budget= / LLM2CLIP_LOSS_MEMORY_BUDGET):"]
    for row in info["loss_memory"]:
        out.append(f"  {row['device']:<5} {row['budget_bytes'] / 2**30:.2f} GiB ({row['source']}; "
                   f"{row['free_bytes'] / 2**30:.2f} GiB free), clip_loss on {row['backend']}"
                   + (", epilogues on a second stream" if row["overlap"] else ""))
        for b, plan in row.get("clip_paths", {}).items():
            path = "keep-logits" if plan["keep_logits"] else "recompute"
            out.append(f"      B={b:<6} {row['dtype']}: {path}, {plan['rows']} rows per chunk")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm2clip_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
