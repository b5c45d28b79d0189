"""Stage ``correctness``: first calls in a fresh process, forced Triton, every value against float64.

CLIP (keep-logits and recompute) and SigLIP (one-pass and two-pass) in bf16 and fp16, loss and every
gradient; the single-stream schedule; the text adapter; the masked mean pool; the distributed losses'
single-rank path. Tolerance (DESIGN.md): the fused error may be at most twice that of the same formula
computed with plain torch in the input's precision, plus 1e-4 for the cases where that error is ~0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from bench.gpu_check_stages.measure import KEEP_ALL, recompute_budget, rel_err
from bench.gpu_check_stages.plan import Sizes
from bench.gpu_check_stages.recorder import Recorder

LOSS_TOLERANCE_NOTE = "tol per value: 2 x plain-torch error in the same precision + 1e-4"


def within_tolerance(err: float, err_plain: float) -> bool:
    """The fused error against float64 is at most twice plain torch's in the same precision, + 1e-4."""
    return err <= 2 * err_plain + 1e-4


def clip64(img: Any, txt: Any, scale: Any) -> Any:
    """Per-pair CLIP loss, the textbook formula (used in float64 as the reference)."""
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    return (per_image + F.cross_entropy(logits.T, labels, reduction="none")) / 2


def siglip64(img: Any, txt: Any, scale: Any, bias: Any) -> Any:
    """Per-image SigLIP loss, the textbook formula (used in float64 as the reference)."""
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(dim=1)


def _loss_inputs(dtype: Any, dev: Any, b: int, d: int, reduction: str) -> tuple[Any, Any, Any]:
    """Unit-norm image and text rows whose positives stand out, as in training; the upstream gradient."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(1)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dev, dtype)
    txt = (0.6 * txt + 0.4 * img).to(dtype)
    upstream = (torch.rand(b, generator=g) + 0.5 if reduction == "none" else torch.ones(())).to(dev)
    return img, txt, upstream


def _loss_pair(kind: str, b: int, reduction: str, memory_budget: Any,
               distributed: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(fused loss forced to Triton, the float64-able reference) for ``kind`` and ``reduction``."""
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    backend = "triton"  # forced everywhere: a backend that cannot serve raises instead of falling back

    def reduce(per: Any) -> Any:
        return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per

    if kind == "clip":
        fused = lambda i, t, s: clip_loss(i, t, s, reduction=reduction, backend=backend,
                                          distributed=distributed, memory_budget=memory_budget)
        ref = lambda i, t, s: reduce(clip64(i, t, s))
    else:
        fused = lambda i, t, s, c: siglip_loss(i, t, s, c, reduction=reduction, backend=backend,
                                               distributed=distributed, memory_budget=memory_budget)
        # OpenCLIP's 'mean' divides the pair-loss total by the number of images.
        ref = lambda i, t, s, c: (siglip64(i, t, s, c).sum() / b if reduction == "mean"
                                  else reduce(siglip64(i, t, s, c)))
    return fused, ref


def loss_check(kind: str, dtype_name: str, dev: Any, b: int, d: int, *, reduction: str = "mean",
               memory_budget: Any = None, distributed: bool = False) -> dict:
    """Fused loss and its gradients vs float64 on the same (low-precision) inputs."""
    import torch

    from llm2clip_fast.ops import _backend, _chunking

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    img, txt, upstream = _loss_inputs(dtype, dev, b, d, reduction)
    scale_v, bias_v = (1 / 0.07, None) if kind == "clip" else (10.0, -10.0)

    def run(fn: Callable[..., Any], cast: Any) -> tuple[Any, list[Any]]:
        leaves = [img.to(cast).requires_grad_(), txt.to(cast).requires_grad_(),
                  torch.tensor(scale_v, device=dev, dtype=torch.float32 if cast != torch.float64 else cast,
                               requires_grad=True)]
        if bias_v is not None:
            leaves.append(torch.tensor(bias_v, device=dev, dtype=leaves[2].dtype, requires_grad=True))
        loss = fn(*leaves)
        return loss.detach(), list(torch.autograd.grad(loss, leaves, upstream.to(loss.dtype)))

    fused, ref = _loss_pair(kind, b, reduction, memory_budget, distributed)
    _backend.clear_selections()
    loss, grads = run(fused, dtype)
    m: dict[str, Any] = {"backend": _backend.last_selected(f"{kind}_loss"),
                         "path": _chunking.last_path(f"{kind}_loss")}
    loss64, grads64 = run(ref, torch.float64)
    lossp, gradsp = run(ref, dtype)
    names = ["loss", "d_image", "d_text", "d_scale"] + (["d_bias"] if bias_v is not None else [])
    ok = bool(torch.isfinite(loss).all().item())
    for name, x, r, p in zip(names, [loss, *grads], [loss64, *grads64], [lossp, *gradsp]):
        err, err_p = rel_err(x, r), rel_err(p, r)
        m[f"{name}_err"] = err
        m[f"{name}_torch_{dtype_name}_err"] = err_p
        ok = ok and within_tolerance(err, err_p)
    m["status"] = "ok" if ok else "fail"
    m["note"] = LOSS_TOLERANCE_NOTE
    return m


def _adapter_models(sizes: Sizes, dev: Any) -> tuple[Any, Any, Any]:
    """The forced-Triton adapter (non-trivial LayerNorm affines) and two references with its weights:
    one in float32, one in float64."""
    import torch

    from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference

    torch.manual_seed(2)
    d, n = sizes.adapter_d, sizes.adapter_out
    fused = TextAdapter(d, n, backend="triton").to(dev)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so their gradients mean something
        for p in fused.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ref = TextAdapterReference(d, n).to(dev)
    ref.load_state_dict(fused.state_dict())
    ref64 = TextAdapterReference(d, n).to(dev, torch.float64)
    ref64.load_state_dict(fused.state_dict())
    return fused, ref, ref64


def adapter_check(dev: Any, sizes: Sizes) -> dict:
    """The forced-Triton text adapter's output and every gradient against float64 (bf16 autocast on
    CUDA); parameters are summarised by the worst one relative to its tolerance."""
    import torch

    from llm2clip_fast.ops import _backend

    fused, ref, ref64 = _adapter_models(sizes, dev)
    x = torch.randn(sizes.adapter_b, sizes.adapter_d, device=dev)
    gy = torch.randn(sizes.adapter_b, sizes.adapter_out, device=dev)
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
    m["status"] = _adapter_errors(m, names, [y, *g], [y64, *g64], [yp, *gp])
    return m


def _adapter_errors(m: dict[str, Any], names: list[str], got: list[Any], ref64: list[Any],
                    plain: list[Any]) -> str:
    """Write the output's, d_x's and the worst parameter's errors into ``m``; ok or fail."""
    worst, ok = 0.0, True
    for name, a, r, p in zip(names, got, ref64, plain):
        err, err_p = rel_err(a, r), rel_err(p, r)
        ok = ok and within_tolerance(err, err_p)
        if name in ("out", "d_x"):
            m[f"{name}_err"], m[f"{name}_torch_err"] = err, err_p
        elif err / (err_p + 1e-4) > worst:
            worst = err / (err_p + 1e-4)
            m["worst_param"], m["worst_param_err"], m["worst_param_torch_err"] = name, err, err_p
    return "ok" if ok else "fail"


def pool_check(dev: Any, sizes: Sizes, backend: str) -> dict:
    """Masked mean pooling of bf16 hidden states (one row full length) and its gradient vs float64."""
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


def distributed_single_rank(rec: Recorder, dev: Any, sizes: Sizes) -> None:
    """The global-batch losses with ``distributed=True`` in a process group of one (NCCL on CUDA)."""
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
                            lambda kind=kind: loss_check(kind, "bf16", dev, sizes.loss_b, sizes.loss_d,
                                                         distributed=True))
        finally:
            dist.destroy_process_group()


def _single_stream_check(dev: Any, b: int, d: int) -> dict:
    os.environ["LLM2CLIP_LOSS_OVERLAP"] = "0"
    try:
        m = loss_check("clip", "bf16", dev, b, d, reduction="sum", memory_budget=recompute_budget(b))
    finally:
        del os.environ["LLM2CLIP_LOSS_OVERLAP"]
    m["note"] = "LLM2CLIP_LOSS_OVERLAP=0: every epilogue on the main stream; " + m["note"]
    return m


def _loss_paths(rec: Recorder, dev: Any, b: int, d: int) -> None:
    """Both CLIP paths and both SigLIP passes, in bf16 and fp16."""
    for dtype in ("bf16", "fp16"):
        for label, budget, reduction in (("keep-logits", KEEP_ALL, "mean"),
                                         ("recompute", recompute_budget(b), "none")):
            rec.attempt(f"clip {dtype} B={b} D={d} {label} {reduction} (forced triton)",
                        lambda dtype=dtype, budget=budget, reduction=reduction: loss_check(
                            "clip", dtype, dev, b, d, reduction=reduction, memory_budget=budget))
        for label, reduction in (("one-pass", "mean"), ("two-pass", "none")):
            rec.attempt(f"siglip {dtype} B={b} D={d} {label} {reduction} (forced triton)",
                        lambda dtype=dtype, reduction=reduction: loss_check("siglip", dtype, dev, b, d,
                                                                            reduction=reduction))


def stage_correctness(rec: Recorder, dev: Any, sizes: Sizes, quick: bool) -> None:
    b, d = sizes.loss_b, sizes.loss_d
    _loss_paths(rec, dev, b, d)
    rec.attempt(f"clip bf16 B={b} D={d} recompute, one stream (forced triton)",
                lambda: _single_stream_check(dev, b, d))
    rec.attempt(f"adapter {sizes.adapter_d}->{sizes.adapter_out} B={sizes.adapter_b} (forced triton)",
                lambda: adapter_check(dev, sizes))
    for backend in ("triton", "cuda"):
        rec.attempt(f"masked_mean_pool {sizes.pool} bf16 (forced {backend})",
                    lambda backend=backend: pool_check(dev, sizes, backend))
    try:
        distributed_single_rank(rec, dev, sizes)
    except Exception as exc:
        rec.add_error("distributed single rank", exc)
