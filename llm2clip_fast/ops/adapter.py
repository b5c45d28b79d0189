"""The text adapter op: public function, backend choice, and the lean autograd Functions.

``text_adapter(x, block_weights, head_weights)`` computes LLM2CLIP's adapter (see
:mod:`llm2clip_fast.models.text_adapter` for the architecture). Backends:

- ``lean`` / ``triton``: one custom autograd Function per residual block (:class:`LeanBlockFunction`)
  and one for the head (:class:`LeanHeadFunction`). Their products are ``torch.addmm``/``torch.mm``
  (cuBLAS on CUDA, oneDNN on CPU) on exactly the operands eager ``nn.Linear`` would use; the LayerNorm,
  GELU (exact erf, as the official TextProj) and dropout around them run as Triton kernels
  (``triton``: :mod:`llm2clip_fast.kernels.adapter`) or torch ops (``lean``). Saved for backward, per
  block: the normalised input ``xhat`` and the pre-activation ``z`` in the product dtype (bf16 under
  bf16 autocast), the LayerNorm's rstd (fp32, per row) and, with dropout, one int64 seed instead of a
  mask; the weights are references. The backward recomputes GELU(z), the dropout mask (from the seed)
  and the LayerNorm output. Under bf16 autocast at d=4096 that is 2d + 4d bytes + 4 = 24.6 KB per row
  and block, against eager's 57.3 KB (the fp32 block input, the bf16 LayerNorm output, z and GELU(z)).
- ``torch``: the same formula with plain torch functions (eager; stores every activation).
- ``recompute``: the torch formula with each block (and the head) under non-reentrant activation
  checkpointing: it keeps only the block inputs (4d bytes per row and block in fp32: 0.67x the lean
  backends') for one extra forward per block. It stays for the case the lean backends do not cover:
  a batch that fits in memory only at the smallest footprint.

The ``lean`` backend's element-wise work runs in the C++ row kernels of ``llm2clip_fast._C``
(csrc/cpu/adapter_cpu.cpp) for CPU float32/bfloat16 tensors and products, else as torch ops.

Dispatch: CUDA tensors run on ``torch`` unless a backend is forced: the lean Functions have not yet
been timed on a GPU (``bench/adapter_throughput.py``'s ``run_gpu_stage`` does it; the fused
all-Triton-GEMM adapter they replace ran 4.8x slower than eager on the H200), so ``triton`` and
``lean`` serve CUDA only when forced. CPU float32/bfloat16 runs on ``lean`` with the C++ row kernels:
measured at least as fast as eager there at less than half of eager's saved bytes
(``bench/adapter_throughput.py``; numbers in the README); other CPU dtypes run on ``torch``.
``recompute`` serves only when forced.

Forcing: ``backend=`` argument, ``LLM2CLIP_BACKEND_TEXT_ADAPTER``, or ``LLM2CLIP_BACKEND``.

torch.compile: the Functions are traced by Dynamo (their Triton kernels and the CPU dropout mask are
custom ops with fake implementations), so ``torch.compile(fullgraph=True)`` of a model calling
:func:`text_adapter` has no graph break whichever backend serves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .._extensions import cpu_extension_error
from . import _backend
from ._availability import dtype_reasons, floating_dtype_reasons, kernel_module_problem, triton_kernel_reasons
from ._backend import Backend, DispatchContext
from ._library import define_op

OP_NAME = "text_adapter"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Seeds are drawn below 2**31 so that the Triton kernels and torch.Generator read them alike.
_SEED_BOUND = 2**31 - 1

BlockWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
HeadWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Eager formula (backend "torch") and its checkpointed variant ("recompute").


def text_adapter_torch(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    l2_normalize: bool = True,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Plain-torch adapter: the formula of :class:`TextAdapterReference`, functionally."""
    if l2_normalize:
        x = F.normalize(x, dim=-1, eps=l2_eps)
    for bw in block_weights:
        x = _block_torch(x, *bw, ln_eps, dropout, training)
    return _head_torch(x, *head_weights, ln_eps)


def _block_torch(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, ln_eps: float, dropout: float,
                 training: bool) -> torch.Tensor:
    d = x.shape[-1]
    h = F.gelu(F.linear(F.layer_norm(x, (d,), ln_w, ln_b, ln_eps), w1, b1))
    if dropout > 0.0 and training:
        h = F.dropout(h, dropout, training=True)
    return x + F.linear(h, w2, b2)


def _head_torch(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                ln_eps: float) -> torch.Tensor:
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, ln_eps), w, b)


def text_adapter_recompute(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    l2_normalize: bool = True,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The torch adapter with per-block activation checkpointing: saves only the (B, d) block inputs."""
    if not _builds_graph(x, block_weights, head_weights):
        # No graph will be built: checkpointing would only add overhead.
        return text_adapter_torch(x, block_weights, head_weights, ln_eps=ln_eps, l2_eps=l2_eps,
                                  l2_normalize=l2_normalize, dropout=dropout, training=training)
    if l2_normalize:
        x = F.normalize(x, dim=-1, eps=l2_eps)
    for bw in block_weights:
        x = checkpoint(_block_torch, x, *bw, ln_eps, dropout, training, use_reentrant=False,
                       preserve_rng_state=True)
    return checkpoint(_head_torch, x, *head_weights, ln_eps, use_reentrant=False)


def _builds_graph(x: torch.Tensor, block_weights: Sequence[BlockWeights], head_weights: HeadWeights) -> bool:
    flat = [t for bw in block_weights for t in bw] + list(head_weights)
    return torch.is_grad_enabled() and any(t.requires_grad for t in (x, *flat))


# ----------------------------------------------------------------------------------------------------
# The lean Functions' element-wise work: torch ops ("lean") or Triton kernels ("triton"). Both take and
# return the same tensors: xhat and a in the product dtype, rstd (B,) fp32, z/h/dz in the product dtype.


def _dropout_keep_mask_impl(seed: torch.Tensor, rows: int, cols: int, p: float,
                            dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=seed.device)
    generator.manual_seed(int(seed.item()))
    return torch.empty((rows, cols), device=seed.device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)


def _dropout_keep_mask_fake(seed: torch.Tensor, rows: int, cols: int, p: float,
                            dtype: torch.dtype) -> torch.Tensor:
    return seed.new_empty((rows, cols), dtype=dtype)


# A custom op so torch.compile traces around the generator; on CUDA the .item() is a device sync,
# which is why CUDA runs the Triton kernels (Philox, seed read on the device) instead.
_dropout_keep_mask = define_op("adapter_dropout_keep_mask", _dropout_keep_mask_impl, _dropout_keep_mask_fake)


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, dtype: torch.dtype, *,
                      backend: str) -> torch.Tensor:
    """The 0/1 dropout keep mask the ``backend`` ("lean" or "triton") draws for a (rows, cols) hidden
    activation from ``seed``: what a test needs to build the eager reference with the same mask.
    (The lean backend's C++ and torch element-wise paths draw the same mask.)"""
    if backend == "triton":
        from ..kernels import adapter as K

        return K.keep_mask(seed, rows, cols, p, dtype)
    if backend == "lean":
        return _dropout_keep_mask(seed, rows, cols, p, dtype)
    raise ValueError(f"backend must be 'lean' or 'triton', got {backend!r}")


class _TorchElementwise:
    """Torch ops for the element-wise parts (CPU; CUDA when forced without Triton)."""

    @staticmethod
    def layer_norm_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                       cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The product's input exactly as eager makes it (one rounding to cd); xhat from the same stats.
        a, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), gamma, beta, eps)
        stat = torch.promote_types(x.dtype, torch.float32)
        mean, rstd = mean.to(stat), rstd.to(stat)
        xhat = torch.sub(x, mean).mul_(rstd).to(cd)
        return xhat, rstd.squeeze(-1), a.to(cd)

    @staticmethod
    def layer_norm_bwd(xhat: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                       dln: torch.Tensor, dres: torch.Tensor | None, dx_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # torch's fused LayerNorm backward given xhat itself (mean 0, rstd 1), then scaled by the real
        # rstd: one vectorised pass instead of a chain of reductions. Math in fp32 (fp64 for fp64).
        stat = torch.promote_types(xhat.dtype, torch.float32)
        rstd = rstd.to(stat)
        xh = xhat.to(stat)
        ones = torch.ones_like(rstd).unsqueeze(-1)
        dx, dgamma, dbeta = torch.ops.aten.native_layer_norm_backward(
            dln.to(stat), xh, (xh.shape[-1],), torch.zeros_like(ones), ones, gamma.to(stat), beta.to(stat),
            (True, True, True))
        dx = dx.mul_(rstd.unsqueeze(-1)) if dres is None else torch.addcmul(dres, dx, rstd.unsqueeze(-1))
        a = torch.addcmul(beta.to(stat), xh, gamma.to(stat)).to(xhat.dtype)
        dres_sum = _column_sum(dres) if dres is not None else dgamma.new_empty(0)
        return dx.to(dx_dtype), a, dgamma, dbeta, dres_sum

    @staticmethod
    def gelu_dropout_fwd(z: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
        h = F.gelu(z)
        if seed is None:
            return h
        return h.mul_(_dropout_keep_mask(seed, z.shape[0], z.shape[1], p, z.dtype)).mul_(1.0 / (1.0 - p))

    @staticmethod
    def gelu_dropout_bwd(z: torch.Tensor, dh: torch.Tensor, seed: torch.Tensor | None, p: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.gelu(z)
        if seed is not None:
            keep = _dropout_keep_mask(seed, z.shape[0], z.shape[1], p, z.dtype)
            h.mul_(keep).mul_(1.0 / (1.0 - p))
            dh = dh * keep * (1.0 / (1.0 - p))
        dz = torch.ops.aten.gelu_backward(dh, z)
        return dz, h, _column_sum(dz)


class _CppElementwise:
    """The C++ row kernels of llm2clip_fast._C (csrc/cpu/adapter_cpu.cpp) for CPU tensors of float32 /
    bfloat16: one pass per op where the torch ops take several (measured in bench/adapter_throughput.py)."""

    @staticmethod
    def layer_norm_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                       cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.llm2clip_fast.adapter_layer_norm_fwd_cpu(x, gamma, beta, eps, cd)

    @staticmethod
    def layer_norm_bwd(xhat: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                       dln: torch.Tensor, dres: torch.Tensor | None, dx_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.llm2clip_fast.adapter_layer_norm_bwd_cpu(xhat, rstd, gamma, beta, dln, dres,
                                                                  dx_dtype)

    @staticmethod
    def gelu_dropout_fwd(z: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
        keep = None if seed is None else _dropout_keep_mask(seed, z.shape[0], z.shape[1], p, z.dtype)
        return torch.ops.llm2clip_fast.adapter_gelu_fwd_cpu(z, keep, 1.0 / (1.0 - p))

    @staticmethod
    def gelu_dropout_bwd(z: torch.Tensor, dh: torch.Tensor, seed: torch.Tensor | None, p: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep = None if seed is None else _dropout_keep_mask(seed, z.shape[0], z.shape[1], p, z.dtype)
        return torch.ops.llm2clip_fast.adapter_gelu_bwd_cpu(z, dh, keep, 1.0 / (1.0 - p))


_CPP_OPS = ("adapter_layer_norm_fwd_cpu", "adapter_layer_norm_bwd_cpu", "adapter_gelu_fwd_cpu",
            "adapter_gelu_bwd_cpu")
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _cpp_problem_at_import() -> str | None:
    problem = cpu_extension_error()
    if problem is None and not all(hasattr(torch.ops.llm2clip_fast, name) for name in _CPP_OPS):
        problem = "llm2clip_fast._C was built without the adapter row kernels; rebuild the extension"
    return problem


# Read once: the forward under torch.compile then reads a constant instead of tracing an import.
_CPP_PROBLEM = _cpp_problem_at_import()


def _cpp_elementwise_problem() -> str | None:
    """Why the C++ row kernels cannot run (None when they can)."""
    return _CPP_PROBLEM


def _register_cpp_fakes() -> None:
    if _cpp_elementwise_problem() is not None:
        return
    torch.library.register_fake("llm2clip_fast::adapter_layer_norm_fwd_cpu", _ln_fwd_fake)
    torch.library.register_fake("llm2clip_fast::adapter_layer_norm_bwd_cpu", _ln_bwd_fake)
    torch.library.register_fake("llm2clip_fast::adapter_gelu_fwd_cpu",
                                lambda z, keep, scale: _gelu_fwd_fake(z, None, 0.0))
    torch.library.register_fake("llm2clip_fast::adapter_gelu_bwd_cpu",
                                lambda z, dh, keep, scale: _gelu_bwd_fake(z, dh, None, 0.0))


# Triton primitives as custom ops (triton_op outside the interpreter: Inductor sees the kernels).
def _ln_fwd_triton(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                   cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import adapter as K

    return K.layer_norm_fwd(x, gamma, beta, eps, cd)


def _ln_fwd_fake(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                 cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape, dtype=cd), x.new_empty(x.shape[:1], dtype=torch.float32),
            x.new_empty(x.shape, dtype=cd))


def _ln_bwd_triton(xhat: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                   dln: torch.Tensor, dres: torch.Tensor | None, dx_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import adapter as K

    return K.layer_norm_bwd(xhat, rstd, gamma, beta, dln, dres, dx_dtype)


def _ln_bwd_fake(xhat: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 dln: torch.Tensor, dres: torch.Tensor | None, dx_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = xhat.shape[-1]
    return (xhat.new_empty(xhat.shape, dtype=dx_dtype), torch.empty_like(xhat),
            xhat.new_empty((d,), dtype=torch.float32), xhat.new_empty((d,), dtype=torch.float32),
            xhat.new_empty((d if dres is not None else 0,), dtype=torch.float32))


def _gelu_fwd_triton(z: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    from ..kernels import adapter as K

    return K.gelu_dropout_fwd(z, seed, p)


def _gelu_fwd_fake(z: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _gelu_bwd_triton(z: torch.Tensor, dh: torch.Tensor, seed: torch.Tensor | None,
                     p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import adapter as K

    return K.gelu_dropout_bwd(z, dh, seed, p)


def _gelu_bwd_fake(z: torch.Tensor, dh: torch.Tensor, seed: torch.Tensor | None,
                   p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty(z.shape[-1:], dtype=torch.float32))


class _TritonElementwise:
    """Triton kernels for the element-wise parts (CUDA; CPU tensors under TRITON_INTERPRET=1)."""

    layer_norm_fwd = staticmethod(define_op("adapter_layer_norm_fwd_triton", _ln_fwd_triton, _ln_fwd_fake,
                                            triton=True))
    layer_norm_bwd = staticmethod(define_op("adapter_layer_norm_bwd_triton", _ln_bwd_triton, _ln_bwd_fake,
                                            triton=True))
    gelu_dropout_fwd = staticmethod(define_op("adapter_gelu_dropout_fwd_triton", _gelu_fwd_triton,
                                              _gelu_fwd_fake, triton=True))
    gelu_dropout_bwd = staticmethod(define_op("adapter_gelu_dropout_bwd_triton", _gelu_bwd_triton,
                                              _gelu_bwd_fake, triton=True))


_ELEMENTWISE = {"torch": _TorchElementwise, "cpp": _CppElementwise, "triton": _TritonElementwise}
_register_cpp_fakes()


def lean_elementwise(x: torch.Tensor, cd: torch.dtype) -> str:
    """Which element-wise implementation the ``lean`` backend runs for ``x`` and product dtype ``cd``:
    "cpp" (CPU, float32/bfloat16, extension built) or "torch"."""
    if (x.device.type == "cpu" and x.dtype in _CPP_DTYPES and cd in _CPP_DTYPES
            and _cpp_elementwise_problem() is None):
        return "cpp"
    return "torch"


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # Inside the Functions every product runs on operands already cast to the compute dtype; autocast
    # would only re-cast (and on CUDA run the LayerNorm in its own fp32 policy).
    return torch.autocast(device_type=device.type, enabled=False)


def _column_sum(g: torch.Tensor) -> torch.Tensor:
    """A bias gradient: column sums accumulated in fp32 (fp64 for fp64)."""
    return g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32))


def _grad(g: torch.Tensor | None, like: torch.Tensor | torch.dtype, needed: bool) -> torch.Tensor | None:
    dtype = like if isinstance(like, torch.dtype) else like.dtype
    return g.to(dtype) if needed and g is not None else None


# ----------------------------------------------------------------------------------------------------
# The lean autograd Functions.


class LeanBlockFunction(torch.autograd.Function):
    """One residual block ``x + W2 dropout(GELU(W1 LN(x) + b1)) + b2`` (see the module docstring).

    forward(x (B, d) float, ln_w, ln_b (d,), w1 (h, d), b1 (h,), w2 (d, h), b2 (d,), cd: the product
    dtype, ln_eps, p: dropout probability, seed: int64 (1,) tensor on x's device or None (no dropout),
    impl: "lean" | "triton") -> (B, d) in x's dtype promoted with cd (fp32 residual stream under
    autocast, as eager). Saves xhat and z in cd, rstd fp32, the seed, and references to the weights.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, cd: torch.dtype, ln_eps: float,
                p: float, seed: torch.Tensor | None, impl: str) -> torch.Tensor:
        ew = _ELEMENTWISE[impl]
        with _autocast_off(x.device):
            xhat, rstd, a = ew.layer_norm_fwd(x, ln_w, ln_b, ln_eps, cd)
            z = torch.addmm(b1.to(cd), a, w1.to(cd).t())
            del a
            h = ew.gelu_dropout_fwd(z, seed, p)
            out = x + torch.addmm(b2.to(cd), h, w2.to(cd).t())
        ctx.save_for_backward(xhat, rstd, z, seed, ln_w, ln_b, w1, w2)
        ctx.cd, ctx.p, ctx.impl, ctx.x_dtype = cd, p, impl, x.dtype
        ctx.bias_dtypes = (b1.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xhat, rstd, z, seed, ln_w, ln_b, w1, w2 = ctx.saved_tensors
        ew, cd, need = _ELEMENTWISE[ctx.impl], ctx.cd, ctx.needs_input_grad
        with _autocast_off(g.device):
            gy = g.to(cd)
            dz, h, db1 = ew.gelu_dropout_bwd(z, torch.mm(gy, w2.to(cd)), seed, ctx.p)
            dw2 = torch.mm(gy.t(), h) if need[5] else None
            del h
            # The LayerNorm backward also adds the residual gradient g and sums its columns: db2.
            dx, a, dln_w, dln_b, db2 = ew.layer_norm_bwd(xhat, rstd, ln_w, ln_b, torch.mm(dz, w1.to(cd)), g,
                                                         ctx.x_dtype)
            dw1 = torch.mm(dz.t(), a) if need[3] else None
        return (dx if need[0] else None, _grad(dln_w, ln_w, need[1]), _grad(dln_b, ln_b, need[2]),
                _grad(dw1, w1, need[3]), _grad(db1, ctx.bias_dtypes[0], need[4]), _grad(dw2, w2, need[5]),
                _grad(db2, ctx.bias_dtypes[1], need[6]), None, None, None, None, None)


class LeanHeadFunction(torch.autograd.Function):
    """The head ``W LN(x) + b``: forward(x (B, d), ln_w, ln_b (d,), w (n, d), b (n,), cd, ln_eps, impl)
    -> (B, n) in cd. Saves xhat in cd, rstd fp32 and references to the weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor, cd: torch.dtype, ln_eps: float, impl: str) -> torch.Tensor:
        with _autocast_off(x.device):
            xhat, rstd, a = _ELEMENTWISE[impl].layer_norm_fwd(x, ln_w, ln_b, ln_eps, cd)
            out = torch.addmm(b.to(cd), a, w.to(cd).t())
        ctx.save_for_backward(xhat, rstd, ln_w, ln_b, w)
        ctx.cd, ctx.impl, ctx.x_dtype, ctx.bias_dtype = cd, impl, x.dtype, b.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xhat, rstd, ln_w, ln_b, w = ctx.saved_tensors
        cd, need = ctx.cd, ctx.needs_input_grad
        with _autocast_off(g.device):
            gy = g.to(cd)
            dx, a, dln_w, dln_b, _ = _ELEMENTWISE[ctx.impl].layer_norm_bwd(
                xhat, rstd, ln_w, ln_b, torch.mm(gy, w.to(cd)), None, ctx.x_dtype)
            dw = torch.mm(gy.t(), a) if need[3] else None
            db = _column_sum(gy) if need[4] else None
        return (dx if need[0] else None, _grad(dln_w, ln_w, need[1]), _grad(dln_b, ln_b, need[2]),
                _grad(dw, w, need[3]), _grad(db, ctx.bias_dtype, need[4]), None, None, None)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM operand dtype nn.Linear would use: the autocast dtype under autocast, else the weight's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed: int64 (1,) on ``device``, from torch's generator of that device (so
    ``torch.manual_seed`` makes a run repeatable)."""
    return torch.randint(0, _SEED_BOUND, (1,), device=device, dtype=torch.int64)


def _lean(backend: str):
    def run(x: torch.Tensor, block_weights: Sequence[BlockWeights], head_weights: HeadWeights, *,
            ln_eps: float = 1e-5, l2_eps: float = 1e-12, l2_normalize: bool = True, dropout: float = 0.0,
            training: bool = False) -> torch.Tensor:
        cd = compute_dtype(x, head_weights[2])
        impl = "triton" if backend == "triton" else lean_elementwise(x, cd)
        if l2_normalize:
            x = F.normalize(x, dim=-1, eps=l2_eps)
        p = float(dropout) if training else 0.0
        for bw in block_weights:
            seed = draw_dropout_seed(x.device) if p > 0.0 else None
            x = LeanBlockFunction.apply(x, *bw, cd, float(ln_eps), p, seed, impl)
        return LeanHeadFunction.apply(x, *head_weights, cd, float(ln_eps), impl)

    run.__name__ = run.__qualname__ = f"text_adapter_{backend}"
    run.__doc__ = (f"The adapter on :class:`LeanBlockFunction` / :class:`LeanHeadFunction` with the "
                   f"{'Triton kernels' if backend == 'triton' else 'C++ row kernels or torch ops'} for the "
                   "element-wise work.")
    return run


text_adapter_lean = _lean("lean")
text_adapter_triton = _lean("triton")


# ----------------------------------------------------------------------------------------------------
# Public op.


def _check_weights(x: torch.Tensor, block_weights: Sequence[BlockWeights], head_weights: HeadWeights) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"x must be a floating-point tensor of shape (B, d), got {got}")
    d = x.shape[1]
    for i, bw in enumerate(block_weights):
        if len(bw) != 6:
            raise ValueError(f"block_weights[{i}] must hold 6 tensors (ln_w, ln_b, w1, b1, w2, b2), "
                             f"got {len(bw)}")
        h = bw[2].shape[0]
        expected = {"ln_w": (d,), "ln_b": (d,), "w1": (h, d), "b1": (h,), "w2": (d, h), "b2": (d,)}
        for name, t in zip(expected, bw):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"block_weights[{i}].{name} must have shape {expected[name]} for x of "
                                 f"shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if len(head_weights) != 4:
        raise ValueError(f"head_weights must hold 4 tensors (ln_w, ln_b, w, b), got {len(head_weights)}")
    n = head_weights[2].shape[0]
    expected = {"ln_w": (d,), "ln_b": (d,), "w": (n, d), "b": (n,)}
    for name, t in zip(expected, head_weights):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"head_weights.{name} must have shape {expected[name]} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(t.shape)}")


def text_adapter(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    l2_normalize: bool = True,
    dropout: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """LLM2CLIP text adapter: L2-normalise, residual pre-LN GELU MLP blocks, LayerNorm, projection.

    x: (B, d) float. block_weights: per block ``(ln_w (d,), ln_b (d,), w1 (h, d), b1 (h,), w2 (d, h),
    b2 (d,))``. head_weights: ``(ln_w (d,), ln_b (d,), w (n, d), b (n,))``. Returns (B, n) in the
    autocast dtype under ``torch.autocast``, else in the weights' dtype (x must match it outside
    autocast, as for nn.Linear). ``l2_normalize=False`` feeds x to the first block unchanged.
    ``dropout`` acts after each GELU when ``training``. Raises ValueError for ``dropout`` outside [0, 1)
    or ``ln_eps``/``l2_eps`` not > 0 (a zero eps divides by zero on a constant row).
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    for name, eps in (("ln_eps", ln_eps), ("l2_eps", l2_eps)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not float(eps) > 0.0:
            raise ValueError(f"{name} must be a float > 0, got {eps!r}")
    _check_weights(x, block_weights, head_weights)
    flat = [t for bw in block_weights for t in bw] + list(head_weights)
    cd = compute_dtype(x, head_weights[2])
    chosen = _backend.select_backend(OP_NAME, [x, *flat], backend=backend, options={"compute_dtype": cd})
    _backend.record_selection(OP_NAME, chosen)
    return chosen.run(x, block_weights, head_weights, ln_eps=ln_eps, l2_eps=l2_eps, l2_normalize=l2_normalize,
                      dropout=dropout, training=training)


# ----------------------------------------------------------------------------------------------------
# Backends.

_CUDA_UNMEASURED = ("serves CUDA only when forced: eager stays automatic there until a GPU run of "
                    "bench/adapter_throughput.py shows the lean Function at least as fast")


def _same_device_reasons(ctx: DispatchContext) -> list[str]:
    return ["x and the weights are on different devices"] if len({t.device for t in ctx.tensors}) > 1 else []


def _triton_reasons(ctx: DispatchContext) -> list[str]:
    why = triton_kernel_reasons(ctx, "adapter") + dtype_reasons(ctx, TRITON_DTYPES)
    why += _same_device_reasons(ctx)
    if not why and kernel_module_problem("adapter") is None:
        from ..kernels.adapter import MAX_FUSED_DIM

        d = ctx.tensors[0].shape[-1]
        if d > MAX_FUSED_DIM:
            why.append(f"d={d} > {MAX_FUSED_DIM}: the LayerNorm kernels keep a whole row per program")
    if not why and not ctx.forced and ctx.device.type == "cuda":
        why.append(_CUDA_UNMEASURED)
    return why


def _lean_reasons(ctx: DispatchContext) -> list[str]:
    why = floating_dtype_reasons(ctx) + _same_device_reasons(ctx)
    if why or ctx.forced:
        return why
    if ctx.device.type == "cuda":
        why.append(_CUDA_UNMEASURED + " (and there the triton backend runs its element-wise work fused)")
    elif ctx.device.type != "cpu":
        why.append(f"serves {ctx.device.type} only when forced")
    else:
        cd = ctx.options.get("compute_dtype", ctx.tensors[-2].dtype)
        problem = _cpp_elementwise_problem()
        if problem is not None:
            why.append(f"serves the CPU automatically with its C++ row kernels only: {problem}")
        elif not {*ctx.dtypes, cd} <= set(_CPP_DTYPES):
            why.append("serves the CPU automatically for float32/bfloat16 tensors and products only (its C++ "
                       "row kernels); with other dtypes its torch-op fallback is slower than eager")
    return why


def _torch_reasons(ctx: DispatchContext) -> list[str]:
    return []


def _recompute_reasons(ctx: DispatchContext) -> list[str]:
    if not ctx.forced:
        return ["serves only when forced: the smallest saved state (block inputs only) for one extra "
                "forward per block"]
    return floating_dtype_reasons(ctx)


_backend.register_op(OP_NAME, [
    Backend("triton", run=text_adapter_triton, reasons=_triton_reasons,
            description="lean Functions: cuBLAS products, Triton LayerNorm/GELU/dropout, xhat+z saved"),
    Backend("lean", run=text_adapter_lean, reasons=_lean_reasons,
            description="lean Functions: torch products and element-wise ops, xhat+z saved"),
    Backend("torch", run=text_adapter_torch, reasons=_torch_reasons,
            description="plain torch (eager): F.layer_norm / F.linear / F.gelu, stores every activation"),
    Backend("recompute", run=text_adapter_recompute, reasons=_recompute_reasons,
            description="torch, per-block activation checkpointing: saves block inputs only"),
], description="LLM2CLIP text adapter", probe=lambda device, dtype: _probe(device, dtype))


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    d, h, n = 64, 128, 32
    x = torch.randn(8, d, device=device, dtype=dtype)
    block = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype),
             torch.randn(h, d, device=device, dtype=dtype), torch.zeros(h, device=device, dtype=dtype),
             torch.randn(d, h, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype))
    head = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype),
            torch.randn(n, d, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype))
    return (x, *block, *head)
