"""The text adapter op: public function, backend choice, autograd around the fused Triton kernels.

``text_adapter(x, block_weights, head_weights)`` computes LLM2CLIP's adapter (see
:mod:`llm2clip_fast.models.text_adapter` for the architecture) with one of two backends:

- ``triton`` (CUDA tensors; CPU tensors only when forced under ``TRITON_INTERPRET=1``): the fused
  kernels of :mod:`llm2clip_fast.kernels.adapter`. Forward per block: one row-statistics kernel, one
  GEMM that LayerNorms its A tile as it loads it and applies bias+GELU in its epilogue, one GEMM with
  bias+residual in its epilogue. The L2 normalisation of the input is folded into the first block's
  LayerNorm statistics and into the first residual add, so the normalised input is never written.
  Saved for backward: the (cast) input, every later block input (B x d, the residual stream), and
  per-row fp32 mean / rstd (and the input's L2 norm): nothing of size B x expansion*d. The backward
  recomputes the LayerNorm output and the pre-GELU activation inside its kernels.
- ``torch``: the same formula with plain torch functions (eager; stores every activation). It serves
  CPU tensors, and dropout > 0 while training: the fused kernels implement no dropout, which shows
  in ``python -m llm2clip_fast.info`` as the op ``text_adapter_dropout``, whose triton backend refuses.
- ``recompute``: the torch formula with each block (and the head) under non-reentrant activation
  checkpointing: it saves what the fused backend saves (the block inputs, B x d each) and recomputes
  the rest in backward with cuBLAS GEMMs: one extra forward GEMM pair per block. Serves only when
  forced; dropout masks are replayed (the RNG state is restored for the recompute).

Automatic dispatch picks ``torch``; ``triton`` serves only when forced. On the first H200 run of
``bench/gpu_check.py`` (2026-11-29; B=8192, 4096 -> 1280, 4 blocks x2, bf16 autocast) the fused
backend's forward+backward took 126 ms against eager torch's 26 ms: its Triton GEMMs reached 92-420
TFLOP/s where cuBLAS reached 465-671 on the same shapes (the weight-gradient GEMMs 4.7-5.1x slower,
the LayerNorm-on-load GEMM 2.1x). It keeps 3.9x fewer bytes of saved activations; ``recompute``
keeps the same few with cuBLAS speed, so it is the backend to force for memory.

Forcing: ``backend=`` argument, ``LLM2CLIP_BACKEND_TEXT_ADAPTER``, or ``LLM2CLIP_BACKEND``.

torch.compile: the fused forward and backward are custom ops (``llm2clip_fast::text_adapter_forward_triton``
and ``text_adapter_backward_triton``, registered through ``torch.library.triton_op``) with fake
implementations; :class:`FusedTextAdapterFunction` around them, and the torch/recompute backends, are
traced by Dynamo, so ``torch.compile(fullgraph=True)`` of a model calling :func:`text_adapter` (or
:class:`llm2clip_fast.models.text_adapter.TextAdapter`) has no graph break whichever backend serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import _backend
from ._availability import dtype_reasons, floating_dtype_reasons, kernel_module_problem, triton_kernel_reasons
from ._backend import Backend, DispatchContext
from ._library import define_op

OP_NAME = "text_adapter"
DROPOUT_OP_NAME = "text_adapter_dropout"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BlockWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
HeadWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def text_adapter_torch(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Plain-torch adapter: the formula of :class:`TextAdapterReference`, functionally."""
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
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The torch adapter with per-block activation checkpointing: saves only the (B, d) block inputs."""
    flat = [t for bw in block_weights for t in bw] + list(head_weights)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *flat))):
        # No graph will be built: checkpointing would only add overhead.
        return text_adapter_torch(x, block_weights, head_weights, ln_eps=ln_eps, l2_eps=l2_eps,
                                  dropout=dropout, training=training)
    x = F.normalize(x, dim=-1, eps=l2_eps)
    for bw in block_weights:
        x = checkpoint(_block_torch, x, *bw, ln_eps, dropout, training, use_reentrant=False,
                       preserve_rng_state=True)
    return checkpoint(_head_torch, x, *head_weights, ln_eps, use_reentrant=False)


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
    dropout: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """LLM2CLIP text adapter: L2-normalise, residual pre-LN GELU MLP blocks, LayerNorm, projection.

    x: (B, d) float (fp32/fp16/bf16). block_weights: per block ``(ln_w (d,), ln_b (d,), w1 (h, d),
    b1 (h,), w2 (d, h), b2 (d,))``. head_weights: ``(ln_w (d,), ln_b (d,), w (n, d), b (n,))``.
    Returns (B, n) in the autocast dtype under ``torch.autocast``, else in ``x``'s dtype (x must match
    the weights' dtype outside autocast, as for nn.Linear). ``dropout`` acts after each GELU when
    ``training``; the fused backend then steps aside for the torch one. Raises ValueError for
    ``dropout`` outside [0, 1) or ``ln_eps``/``l2_eps`` not > 0 (a zero eps divides by zero on a
    constant row).
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    for name, eps in (("ln_eps", ln_eps), ("l2_eps", l2_eps)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not float(eps) > 0.0:
            raise ValueError(f"{name} must be a float > 0, got {eps!r}")
    _check_weights(x, block_weights, head_weights)
    flat = [t for bw in block_weights for t in bw] + list(head_weights)
    options = {"dropout": float(dropout), "training": bool(training)}
    if dropout > 0.0 and training:
        chosen = _backend.select_backend(DROPOUT_OP_NAME, [x, *flat], backend=backend or
                                         _backend.env_forced_backend(OP_NAME), options=options)
    else:
        chosen = _backend.select_backend(OP_NAME, [x, *flat], backend=backend, options=options)
    # Recorded under the public op name whichever variant chose: benches ask what `text_adapter` ran.
    _backend.record_selection(OP_NAME, chosen)
    return chosen.run(x, block_weights, head_weights, ln_eps=ln_eps, l2_eps=l2_eps,
                      dropout=dropout, training=training)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM operand dtype nn.Linear would use: the autocast dtype under autocast, else the weight's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


_BLOCK_TENSORS = 6  # ln_w, ln_b, w1, b1, w2, b2
_HEAD_TENSORS = 4  # ln_w, ln_b, w, b


def _split_weights(weights: Sequence[torch.Tensor],
                   num_blocks: int) -> tuple[list[BlockWeights], HeadWeights]:
    """The flat weight list autograd sees, back into per-block tuples and the head tuple."""
    want = _BLOCK_TENSORS * num_blocks + _HEAD_TENSORS
    if len(weights) != want:
        raise RuntimeError(f"fused adapter: {len(weights)} weight tensors for {num_blocks} blocks, "
                           f"expected {want}")
    blocks = [tuple(weights[_BLOCK_TENSORS * i: _BLOCK_TENSORS * (i + 1)]) for i in range(num_blocks)]
    return blocks, tuple(weights[_BLOCK_TENSORS * num_blocks:])  # type: ignore[return-value]


@dataclass
class _SavedForBackward:
    """What the fused forward keeps, by name. ``inputs``, ``means`` and ``rstds`` have one entry per block
    plus one for the head (the head's input is the last block's output); ``norm0`` is the raw input's L2
    norm (the first LayerNorm's statistics fold it in)."""

    norm0: torch.Tensor
    inputs: list[torch.Tensor]
    means: list[torch.Tensor]
    rstds: list[torch.Tensor]
    weights: list[torch.Tensor]

    def flat(self) -> list[torch.Tensor]:
        return [self.norm0, *self.inputs, *self.means, *self.rstds, *self.weights]

    def activations(self) -> list[torch.Tensor]:
        """What the fused forward op returns after its output: all but the input x and the weights."""
        return [self.norm0, *self.inputs[1:], *self.means, *self.rstds]

    @classmethod
    def from_activations(cls, x: torch.Tensor, activations: Sequence[torch.Tensor],
                         weights: Sequence[torch.Tensor], num_blocks: int) -> _SavedForBackward:
        n = num_blocks + 1
        want = 1 + num_blocks + 2 * n
        if len(activations) != want:
            raise RuntimeError(f"fused adapter: {len(activations)} activations for {num_blocks} blocks, "
                               f"expected {want}")
        inputs_end = 1 + num_blocks
        return cls(norm0=activations[0], inputs=[x, *activations[1:inputs_end]],
                   means=list(activations[inputs_end: inputs_end + n]),
                   rstds=list(activations[inputs_end + n:]), weights=list(weights))

    @classmethod
    def from_flat(cls, saved: Sequence[torch.Tensor], num_blocks: int) -> _SavedForBackward:
        n = num_blocks + 1  # stages: the blocks and the head
        want = 1 + 3 * n + _BLOCK_TENSORS * num_blocks + _HEAD_TENSORS
        if len(saved) != want:
            raise RuntimeError(f"fused adapter: {len(saved)} saved tensors for {num_blocks} blocks, "
                               f"expected {want}")
        return cls(norm0=saved[0], inputs=list(saved[1: 1 + n]), means=list(saved[1 + n: 1 + 2 * n]),
                   rstds=list(saved[1 + 2 * n: 1 + 3 * n]), weights=list(saved[1 + 3 * n:]))


def _fused_forward_impl(x: torch.Tensor, weights: list[torch.Tensor], num_blocks: int, dot_dtype: torch.dtype,
                       ln_eps: float, l2_eps: float, keep: bool) -> list[torch.Tensor]:
    """The fused forward: ``[out]``, then (``keep``) :meth:`_SavedForBackward.activations`."""
    from ..kernels import adapter as K

    x = x.contiguous()
    weights = [w.contiguous() for w in weights]
    blocks, (lnf_w, lnf_b, wp, bp) = _split_weights(weights, num_blocks)
    # keep=False (no autograd graph will be built: inference) drops block inputs once used.
    mean, rstd, norm0 = K.row_stats(x, ln_eps, l2_eps)
    inputs, means, rstds = [x], [mean], [rstd]
    cur = x
    for i, (ln_w, ln_b, w1, b1, w2, b2) in enumerate(blocks):
        h = K.fused_linear(cur, w1.to(dot_dtype), b1, out_dtype=dot_dtype, ln=(mean, rstd, ln_w, ln_b),
                           gelu=True)
        cur = K.fused_linear(h, w2.to(dot_dtype), b2, out_dtype=x.dtype, residual=cur,
                             residual_norm=norm0 if i == 0 else None, l2_eps=l2_eps)
        del h
        mean, rstd, _ = K.row_stats(cur, ln_eps)
        if keep:
            inputs.append(cur)
            means.append(mean)
            rstds.append(rstd)
    out = K.fused_linear(cur, wp.to(dot_dtype), bp, out_dtype=dot_dtype, ln=(mean, rstd, lnf_w, lnf_b))
    if not keep:
        return [out]
    return [out, *_SavedForBackward(norm0, inputs, means, rstds, weights).activations()]


def _fused_forward_fake(x: torch.Tensor, weights: list[torch.Tensor], num_blocks: int,
                        dot_dtype: torch.dtype, ln_eps: float, l2_eps: float,
                        keep: bool) -> list[torch.Tensor]:
    b = x.shape[0]
    out = x.new_empty((b, weights[-2].shape[0]), dtype=dot_dtype)
    if not keep:
        return [out]
    stats = [x.new_empty((b,), dtype=torch.float32) for _ in range(2 * (num_blocks + 1))]
    return [out, x.new_empty((b,), dtype=torch.float32),
            *[x.new_empty(x.shape) for _ in range(num_blocks)], *stats]


def _fused_backward_impl(dout: torch.Tensor, x: torch.Tensor, activations: list[torch.Tensor],
                         weights: list[torch.Tensor], num_blocks: int, dot_dtype: torch.dtype,
                         l2_eps: float) -> list[torch.Tensor]:
    """Gradients ``[dx, *d(weights)]`` of the fused adapter from what :func:`_fused_forward_impl` kept."""
    from ..kernels import adapter as K

    nb, cd = num_blocks, dot_dtype
    weights = [w.contiguous() for w in weights]
    st = _SavedForBackward.from_activations(x.contiguous(), activations, weights, nb)
    blocks, (lnf_w, lnf_b, wp, _) = _split_weights(st.weights, nb)
    dout = dout.contiguous().to(cd)

    xn, mean, rstd = st.inputs[nb], st.means[nb], st.rstds[nb]
    dwp, dbp = K.weight_grad(dout, xn, dot_dtype=cd, ln=(mean, rstd, lnf_w, lnf_b))
    dln = torch.mm(dout, wp.to(cd))
    g, dlnf_w, dlnf_b = K.layernorm_bwd(xn, mean, rstd, lnf_w, dln, norm=st.norm0 if nb == 0 else None,
                                        l2_eps=l2_eps)
    block_grads: list[list[torch.Tensor]] = [[] for _ in range(nb)]
    for i in reversed(range(nb)):
        ln_w, ln_b, w1, b1, w2, _ = blocks[i]
        xi, mean, rstd = st.inputs[i], st.means[i], st.rstds[i]
        w1c = w1.to(cd)
        dz, h = K.ln_gelu_bwd(xi, mean, rstd, ln_w, ln_b, w1c, b1, g, w2.to(cd))
        dw2, db2 = K.weight_grad(g, h, dot_dtype=cd)
        del h
        dw1, db1 = K.weight_grad(dz, xi, dot_dtype=cd, ln=(mean, rstd, ln_w, ln_b))
        dln = torch.mm(dz, w1c)
        del dz
        g, dln_w, dln_b = K.layernorm_bwd(xi, mean, rstd, ln_w, dln, dres=g,
                                          norm=st.norm0 if i == 0 else None, l2_eps=l2_eps)
        block_grads[i] = [dln_w, dln_b, dw1, db1, dw2, db2]
    grads = [gr for bg in block_grads for gr in bg] + [dlnf_w, dlnf_b, dwp, dbp]
    return [g.to(x.dtype), *[gr.to(w.dtype) for gr, w in zip(grads, st.weights)]]


def _fused_backward_fake(dout: torch.Tensor, x: torch.Tensor, activations: list[torch.Tensor],
                         weights: list[torch.Tensor], num_blocks: int, dot_dtype: torch.dtype,
                         l2_eps: float) -> list[torch.Tensor]:
    return [torch.empty_like(x), *[torch.empty_like(w) for w in weights]]


# torch.library ops (llm2clip_fast::text_adapter_*_triton) with fakes: torch.compile traces the autograd
# Function below, and a model calling the fused adapter, without a graph break; Inductor sees the
# kernels (ops/_library.py).
_fused_forward = define_op("text_adapter_forward_triton", _fused_forward_impl, _fused_forward_fake,
                           triton=True)
_fused_backward = define_op("text_adapter_backward_triton", _fused_backward_impl, _fused_backward_fake,
                            triton=True)


class FusedTextAdapterFunction(torch.autograd.Function):
    """Autograd around the fused kernels of :mod:`llm2clip_fast.kernels.adapter`.

    Saved for backward (:class:`_SavedForBackward`): the input x (B, d) and every later block input
    (B, d) in x's dtype, the row statistics (fp32 mean and rstd per LayerNorm, the input's L2 norm),
    and the weights (references, not copies). The LayerNorm outputs, pre-GELU and GELU activations are
    recomputed in backward. Weight gradients come from ``_weight_grad_kernel`` (LayerNorm-on-load, bias
    gradient fused); the input-gradient GEMMs ``dz @ W1`` and ``dout @ Wp`` are torch.mm: their epilogue
    is plain. Forward and backward are one custom op each (``text_adapter_forward_triton`` and
    ``text_adapter_backward_triton``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dot_dtype: torch.dtype, ln_eps: float, l2_eps: float,
                num_blocks: int, keep: bool, *weights: torch.Tensor) -> torch.Tensor:
        outs = _fused_forward(x, list(weights), num_blocks, dot_dtype, ln_eps, l2_eps, keep)
        if keep:
            st = _SavedForBackward.from_activations(x, outs[1:], list(weights), num_blocks)
            ctx.save_for_backward(*st.flat())
        ctx.num_blocks = num_blocks
        ctx.dot_dtype = dot_dtype
        ctx.l2_eps = l2_eps
        return outs[0]

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        st = _SavedForBackward.from_flat(ctx.saved_tensors, ctx.num_blocks)
        grads = _fused_backward(dout, st.inputs[0], st.activations(), st.weights, ctx.num_blocks,
                                ctx.dot_dtype, ctx.l2_eps)
        return (grads[0], None, None, None, None, None, *grads[1:])


def text_adapter_triton(
    x: torch.Tensor,
    block_weights: Sequence[BlockWeights],
    head_weights: HeadWeights,
    *,
    ln_eps: float = 1e-5,
    l2_eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The adapter on the fused Triton kernels (no dropout: dispatch sends dropout to the torch path)."""
    if dropout > 0.0 and training:
        raise ValueError("the fused adapter implements no dropout; use the torch backend for dropout > 0")
    flat = [t for bw in block_weights for t in bw] + list(head_weights)
    cd = compute_dtype(x, head_weights[2])
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *flat))
    return FusedTextAdapterFunction.apply(x, cd, float(ln_eps), float(l2_eps), len(block_weights), keep,
                                          *flat)


def _triton_reasons(ctx: DispatchContext) -> list[str]:
    why = triton_kernel_reasons(ctx, "adapter") + dtype_reasons(ctx, SUPPORTED_DTYPES)
    if len({t.device for t in ctx.tensors}) > 1:
        why.append("x and the weights are on different devices")
    if not why and kernel_module_problem("adapter") is None:
        from ..kernels.adapter import MAX_FUSED_DIM

        d = ctx.tensors[0].shape[-1]
        if d > MAX_FUSED_DIM:
            why.append(f"d={d} > {MAX_FUSED_DIM}: the fused LayerNorm backward keeps a whole row per program")
    if ctx.options.get("dropout", 0.0) > 0.0 and ctx.options.get("training", False):
        why.append("dropout > 0 while training: the fused kernels implement no dropout, the torch path runs")
    if not ctx.forced and not why:
        why.append("serves only when forced: slower than torch on the H200 (fwd+bwd 126 vs 26 ms at B=8192, "
                   "4096->1280, bench/gpu_check.py); force it, or 'recompute', for fewer saved activations")
    return why


def _triton_reasons_with_dropout(ctx: DispatchContext) -> list[str]:
    # The dropout op's probe carries no options; its whole purpose is the dropout case.
    return _triton_reasons(DispatchContext(ctx.tensors, ctx.forced, {"dropout": 1.0, "training": True}))


def _torch_reasons(ctx: DispatchContext) -> list[str]:
    return []


def _recompute_reasons(ctx: DispatchContext) -> list[str]:
    if not ctx.forced:
        return ["serves only when forced: trades one extra forward per block for activation memory"]
    return floating_dtype_reasons(ctx)


_TRITON = Backend("triton", run=text_adapter_triton, reasons=_triton_reasons,
                  description="fused Triton: LN-on-load GEMMs, bias+GELU/bias+residual epilogues, recompute")
_TRITON_DROPOUT = Backend("triton", run=text_adapter_triton, reasons=_triton_reasons_with_dropout,
                          description="fused Triton (no dropout: refuses)")
_TORCH = Backend("torch", run=text_adapter_torch, reasons=_torch_reasons,
                 description="plain torch (eager): F.layer_norm / F.linear / F.gelu, stores every activation")
_RECOMPUTE = Backend("recompute", run=text_adapter_recompute, reasons=_recompute_reasons,
                     description="torch, per-block activation checkpointing: saves block inputs only")


def _probe(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    d, h, n = 64, 128, 32
    x = torch.randn(8, d, device=device, dtype=dtype)
    block = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype),
             torch.randn(h, d, device=device, dtype=dtype), torch.zeros(h, device=device, dtype=dtype),
             torch.randn(d, h, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype))
    head = (torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype),
            torch.randn(n, d, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype))
    return (x, *block, *head)


_backend.register_op(OP_NAME, [_TRITON, _TORCH, _RECOMPUTE],
                     description="LLM2CLIP text adapter (no dropout, or eval)",
                     probe=_probe)
_backend.register_op(DROPOUT_OP_NAME, [_TRITON_DROPOUT, _TORCH, _RECOMPUTE], probe=_probe,
                     description="LLM2CLIP text adapter while training with dropout > 0")
