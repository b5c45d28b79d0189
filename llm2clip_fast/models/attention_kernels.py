"""Which attention kernel a vision tower runs on, checked at run time rather than assumed.

``torch.nn.functional.scaled_dot_product_attention`` (SDPA, what transformers' ``"sdpa"`` attention and
timm's fused attention call) picks among several kernels per call: FlashAttention-2 (CUDA, 16-bit),
cuDNN's fused attention (CUDA, Hopper and later), the memory-efficient (cutlass/xformers-derived) kernel,
a fused CPU flash kernel, and the unfused "math" formula. Which one serves depends on the device, dtype,
head size, masks and the build. xformers' ``memory_efficient_attention`` is another kernel where it is
installed (transformers towers only, through :mod:`.xformers_attention`).

- :func:`kernel_availability`: for an attention shape, each SDPA kernel's verdict (it ran, or why not:
  the warnings torch emits when it refuses) and xformers'.
- :func:`observed_kernel`: the aten kernel SDPA actually dispatched to for a shape (recorded with a
  dispatch mode, so it is what ran, not a prediction).
- :func:`choose_kernel`: the kernel the tower should pin. On CUDA every available kernel is timed
  (forward + backward at the tower's attention shape) and the fastest wins; elsewhere SDPA's own choice
  stands (one fused CPU kernel exists; timing a few milliseconds on a shared CPU would only add noise).
- :class:`AttentionChoice`: the result, with the timings and refusals, as the trainer, the bench and
  ``python -m llm2clip_fast.info`` report it.

The chosen SDPA kernel is pinned with ``torch.nn.attention.sdpa_kernel`` around the tower's forward
(:meth:`llm2clip_fast.models.vision.VisionTower.set_attention_kernel`); the backward runs the matching
backward kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# Our names for the kernels, fastest-first as a tie-break order.
SDPA_KERNELS = ("flash", "cudnn", "efficient", "math")
KERNELS = (*SDPA_KERNELS, "xformers")

# The aten ops each SDPA kernel dispatches to (forward), as recorded by observed_kernel.
_ATEN_KERNELS = {
    "aten._scaled_dot_product_flash_attention.default": "flash",
    "aten._scaled_dot_product_flash_attention_for_cpu.default": "flash",
    "aten._scaled_dot_product_cudnn_attention.default": "cudnn",
    "aten._scaled_dot_product_efficient_attention.default": "efficient",
    "aten._efficient_attention_forward.default": "efficient",
    "aten._scaled_dot_product_attention_math.default": "math",
    "aten._safe_softmax.default": "math",
}


def _sdp_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


@contextlib.contextmanager
def pinned(kernel: str | None) -> Iterator[None]:
    """Run the enclosed SDPA calls on ``kernel`` only (one of :data:`SDPA_KERNELS`); None or
    "xformers" (a transformers attention implementation, not an SDPA kernel): no restriction."""
    if kernel is None or kernel == "xformers":
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdp_backend(kernel)]):
        yield


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (batch, heads, tokens, head_dim) on a device in a dtype."""

    batch: int
    heads: int
    tokens: int
    head_dim: int
    device: str = "cpu"
    dtype: str = "float32"

    def tensors(self, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = getattr(torch, self.dtype)
        shape = (self.batch, self.heads, self.tokens, self.head_dim)
        gen = torch.Generator(device=self.device).manual_seed(0)
        return tuple(torch.randn(shape, device=self.device, dtype=dtype, generator=gen)
                     .requires_grad_(requires_grad) for _ in range(3))  # type: ignore[return-value]


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _kernel_of(ops: list[str]) -> str | None:
    for op in ops:
        if op in _ATEN_KERNELS:
            return _ATEN_KERNELS[op]
    return None


def observed_kernel(shape: AttentionShape, kernel: str | None = None) -> str:
    """The SDPA kernel that runs for ``shape`` (``kernel``: pinned to that one first). Raises
    RuntimeError with torch's reasons when the pinned kernel cannot serve."""
    q, k, v = shape.tensors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with pinned(kernel), _RecordOps() as rec:
                F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:
            reasons = [str(w.message) for w in caught] or [str(exc).splitlines()[0]]
            raise RuntimeError("; ".join(dict.fromkeys(reasons))) from None
    return _kernel_of(rec.ops) or "math"


def xformers_reasons(device: str) -> list[str]:
    """Why xformers' kernel cannot serve here (empty when it can)."""
    why = []
    if importlib.util.find_spec("xformers") is None:
        why.append("xformers is not installed")
    if device != "cuda":
        why.append("xformers' memory_efficient_attention runs on CUDA only")
    return why


def kernel_availability(shape: AttentionShape) -> dict[str, list[str]]:
    """``{kernel: reasons it cannot serve}`` (empty list: it serves) for every kernel of :data:`KERNELS`."""
    out: dict[str, list[str]] = {}
    for name in SDPA_KERNELS:
        if shape.device != "cuda" and name in ("cudnn", "efficient"):
            out[name] = [f"SDPA's {name} kernel runs on CUDA only"]
            continue
        try:
            got = observed_kernel(shape, name)
        except RuntimeError as exc:
            out[name] = [str(exc)]
            continue
        out[name] = [] if got == name else [f"pinned to {name}, SDPA ran {got}"]
    out["xformers"] = xformers_reasons(shape.device)
    return out


def _time_kernel(shape: AttentionShape, kernel: str, reps: int = 5) -> float:
    """Median ms of one forward + backward of ``kernel`` at ``shape`` (CUDA events)."""
    q, k, v = shape.tensors(requires_grad=True)
    grad = torch.randn_like(q)
    if kernel == "xformers":
        import xformers.ops as xops

        def run() -> None:
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out.backward(grad.transpose(1, 2))
    else:
        def run() -> None:
            with pinned(kernel):
                F.scaled_dot_product_attention(q, k, v).backward(grad)
    run()  # first call: kernel selection, autotuning, allocation
    times = []
    for _ in range(reps):
        if shape.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


@dataclass
class AttentionChoice:
    """The attention kernel a tower runs on and how it was chosen.

    kernel: one of :data:`KERNELS`; implementation: "sdpa" or "xformers" (the tower's attention code
    path); shape: the attention call it was chosen for; how: "timed" (fastest of the timed kernels),
    "sdpa default" (SDPA's own choice, observed) or "forced"; timings_ms: forward+backward per kernel
    when timed; refusals: why each other kernel cannot serve.
    """

    kernel: str
    implementation: str
    shape: dict[str, Any]
    how: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        timed = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(self.timings_ms.items(), key=lambda kv: kv[1]))
        return (f"attention: {self.kernel} ({self.implementation}, {self.how}"
                f"{'; fwd+bwd ' + timed if timed else ''})")


def choose_kernel(shape: AttentionShape, *, xformers_ok: bool = True, forced: str | None = None,
                  time_on_cuda: bool = True) -> AttentionChoice:
    """The attention kernel for ``shape``. ``xformers_ok``: the tower can route attention through xformers
    (transformers towers). ``forced``: one of :data:`KERNELS`, checked (ValueError with the reasons when
    it cannot serve). On CUDA (``time_on_cuda``) the serving kernels are timed and the fastest chosen."""
    avail = kernel_availability(shape)
    if not xformers_ok and not avail["xformers"]:
        avail["xformers"] = ["this tower's attention code calls SDPA only (timm); xformers needs a "
                             "transformers tower"]
    elif not xformers_ok:
        avail["xformers"].append("this tower's attention code calls SDPA only")
    serving = [k for k in KERNELS if not avail[k]]
    refusals = {k: why for k, why in avail.items() if why}
    info = asdict(shape)
    if forced is not None:
        if forced not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS} (or auto), got {forced!r}")
        if avail[forced]:
            raise ValueError(f"attention kernel {forced!r} cannot serve {shape}: {'; '.join(avail[forced])}")
        return AttentionChoice(forced, "xformers" if forced == "xformers" else "sdpa", info, "forced",
                               refusals=refusals)
    if shape.device == "cuda" and time_on_cuda and len(serving) > 1:
        timings = {}
        for k in serving:
            if k == "math" and len(serving) > 1:
                continue  # the unfused formula never wins where a fused kernel serves; skip its memory
            try:
                timings[k] = _time_kernel(shape, k)
            except RuntimeError as exc:  # e.g. out of memory at this shape
                refusals[k] = [f"timing failed: {exc}"]
        if timings:
            best = min(timings, key=timings.get)
            return AttentionChoice(best, "xformers" if best == "xformers" else "sdpa", info, "timed",
                                   timings_ms=timings, refusals=refusals)
    observed = observed_kernel(shape)
    return AttentionChoice(observed, "sdpa", info, "sdpa default", refusals=refusals)


def machine_report(dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict[str, Any]]:
    """For ``python -m llm2clip_fast.info``: at a ViT-L/14-336 attention shape (16 heads, 577 tokens,
    head size 64; batch 1), per device and dtype: the kernel SDPA runs and why each other kernel cannot."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for dtype in dtypes:
            shape = AttentionShape(1, 16, 577, 64, device, dtype)
            try:
                serves = observed_kernel(shape)
            except RuntimeError as exc:
                serves = f"error: {exc}"
            avail = kernel_availability(shape)
            rows.append({"device": device, "dtype": dtype, "serves": serves,
                         "available": [k for k, why in avail.items() if not why],
                         "refusals": {k: why for k, why in avail.items() if why}})
    return rows


__all__ = [
    "KERNELS",
    "SDPA_KERNELS",
    "AttentionChoice",
    "AttentionShape",
    "choose_kernel",
    "kernel_availability",
    "machine_report",
    "observed_kernel",
    "pinned",
]
