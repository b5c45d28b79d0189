"""Stage ``env``: GPU name, clocks, versions (the peers' too), ``python -m llm2clip_fast.info``."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.gpu_check_stages.plan import Sizes
from bench.gpu_check_stages.recorder import Recorder

LIBRARIES = ("triton", "transformers", "peft", "bitsandbytes", "webdataset")
PEERS = ("inf-cl", "siglip-kernel")  # the loss_compare peers (--wheels installs them)
NVIDIA_SMI_QUERY = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"


def versions() -> dict[str, Any]:
    """Python, torch, the optional libraries, the peers and where llm2clip_fast was imported from."""
    import torch

    m: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda or "none"}
    for name in LIBRARIES:
        spec = importlib.util.find_spec(name)
        m[name] = importlib.import_module(name).__version__ if spec else "not installed"
    from importlib import metadata

    for peer in PEERS:
        try:
            m[peer] = metadata.version(peer)
        except metadata.PackageNotFoundError:
            m[peer] = "not installed"
    import llm2clip_fast

    m["llm2clip_fast"] = getattr(llm2clip_fast, "__version__", "?")
    m["llm2clip_fast_path"] = str(Path(llm2clip_fast.__file__).parent)
    return m


def gpu_properties(dev: Any) -> dict[str, Any]:
    """The device's name, capability, memory and SMs, and nvidia-smi's driver, clocks and power."""
    import torch

    if dev.type != "cuda":
        return {"status": "skipped", "note": "no CUDA device (quick run on CPU)", "cpu_count": os.cpu_count()}
    p = torch.cuda.get_device_properties(dev)
    m = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": p.total_memory / 2**30,
         "sms": p.multi_processor_count, "device_count": torch.cuda.device_count()}
    m["nvidia_smi"] = _nvidia_smi()
    return m


def _nvidia_smi() -> str:
    try:
        q = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return q.stdout.strip().splitlines()[0] if q.stdout.strip() else q.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def info_output(folder: Path) -> dict[str, Any]:
    """``llm2clip_fast.info`` in this process, its output kept in ``folder/info.txt``."""
    from llm2clip_fast import info as info_cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # this stage is its own process already
        rc = info_cli.main([])
    (folder / "info.txt").write_text(buf.getvalue())
    return {"status": "ok" if rc == 0 else "fail", "returncode": rc,
            "lines": len(buf.getvalue().splitlines()), "note": "full output in info.txt"}


def stage_env(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    rec.attempt("versions", versions)
    rec.attempt("gpu", lambda: gpu_properties(dev))
    rec.attempt("llm2clip_fast.info", lambda: info_output(rec.path.parent))
