"""The ops as torch.library custom ops: opcheck of every primitive, and torch.compile(fullgraph=True).

Each primitive that Dynamo cannot trace itself (C++, Triton, raw CUDA) is a custom op with a fake; the
autograd Functions around them are traced. ``torch.library.opcheck`` checks schema, fake and
dispatch of each op on small odd shapes; a tiny model calling each public op (every CPU-servable
backend) compiles with ``fullgraph=True`` (a graph break is an error) and matches eager values and
gradients. The compile backend is ``aot_eager``: it runs AOTAutograd (functionalisation, the fakes,
the traced backward) without Inductor's slow CPU code generation. Under ``TRITON_INTERPRET=1`` the
Triton primitives are plain custom ops (ops/_library.py); the GPU test at the end compiles them with
Inductor, which sees their kernels through ``triton_op``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm2clip_fast.losses import ClipLoss, SigLipLoss
from llm2clip_fast.models.text_adapter import TextAdapter
from llm2clip_fast.ops import _backend
from llm2clip_fast.ops import adapter as adapter_ops
from llm2clip_fast.ops import clip_loss as clip_ops
from llm2clip_fast.ops import siglip_loss as siglip_ops
from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool

OPS = torch.ops.llm2clip_fast
HAS_CPU_OPS = all(hasattr(OPS, n)
                  for n in ("clip_lse_forward", "siglip_loss_forward", "masked_mean_pool_forward"))
needs_cpu_ops = pytest.mark.skipif(not HAS_CPU_OPS, reason="llm2clip_fast._C built without the CPU ops")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _loss_pair(m=5, n=7, d=11):
    return _randn(m, d, seed=1), _randn(n, d, seed=2)


# ---- opcheck: schema, fake tensors, dispatch of every primitive ------------------------------------


def _clip_backward_args(m, n, d, kept=False):
    """Arguments of a clip_lse_backward op: with the kept (m, n) logits, or an empty tensor."""
    image, text = _loss_pair(m, n, d)
    scale = torch.tensor(2.5)
    row, col, _ = clip_ops._reference_lse_forward(image, text, scale, 3, False)
    logits = image @ text.t() if kept else image.new_empty((0, n))
    return image, text, scale, row, col, _randn(m, seed=3), _randn(n, seed=4), logits, 3


def _opcheck_cases():
    image, text = _loss_pair()
    s, b = torch.tensor(2.5), torch.tensor(-1.5)
    hidden = _randn(3, 6, 13, seed=5)
    mask = (_randn(3, 6, seed=6) > 0).to(torch.uint8)
    cases = [
        ("clip_lse_forward_triton", (image, text, s, 3, False)),
        ("clip_lse_forward_triton", (image, text, s, 3, True)),
        ("clip_lse_backward_triton", _clip_backward_args(5, 7, 11)),
        ("clip_lse_backward_triton", _clip_backward_args(5, 7, 11, kept=True)),
        ("siglip_forward_triton", (image, text, s, b, 1, 2)),
        ("siglip_backward_triton", (image, text, s, b, _randn(5, seed=7), -2, 2)),
        ("siglip_fused_triton", (image, text, s, b, 0, 2)),
        ("masked_mean_pool_triton", (hidden, mask, True, 1e-12)),
    ]
    cpu = [
        ("clip_lse_forward", (image, text, s, 3, False)),
        ("clip_lse_forward", (image, text, s, 3, True)),
        ("clip_lse_backward", _clip_backward_args(5, 7, 11)),
        ("clip_lse_backward", _clip_backward_args(5, 7, 11, kept=True)),
        ("siglip_loss_forward", (image, text, s, b, 1, 2)),
        ("siglip_loss_backward", (image, text, s, b, torch.tensor(0.2), 0, 2)),
        ("siglip_loss_fused", (image, text, s, b, 0, 2)),
        ("masked_mean_pool_forward", (hidden, mask, False, 1e-12)),
    ]
    return cases + [pytest.param(name, args, marks=needs_cpu_ops) for name, args in cpu]


@pytest.mark.parametrize(("name", "args"), _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_primitives(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args)


def _adapter_primitive_cases():
    x = _randn(7, 12, seed=9)
    gamma, beta = 1 + 0.1 * _randn(12, seed=10), 0.1 * _randn(12, seed=11)
    xhat = torch.nn.functional.layer_norm(x, (12,)).bfloat16()
    rstd, dln, dres = 1 + _randn(7, seed=12).abs(), _randn(7, 12, seed=13).bfloat16(), _randn(7, 12, seed=14)
    z, dh, seed = _randn(7, 24, seed=15).bfloat16(), _randn(7, 24, seed=16).bfloat16(), torch.tensor([5])
    triton = [
        ("adapter_layer_norm_fwd_triton", (x, gamma, beta, 1e-5, torch.bfloat16)),
        ("adapter_layer_norm_bwd_triton", (xhat, rstd, gamma, beta, dln, dres, torch.float32)),
        ("adapter_layer_norm_bwd_triton", (xhat, rstd, gamma, beta, dln, None, torch.float32)),
        ("adapter_gelu_dropout_fwd_triton", (z, seed, 0.25)),
        ("adapter_gelu_dropout_bwd_triton", (z, dh, None, 0.0)),
        ("adapter_dropout_keep_mask", (seed, 7, 24, 0.25, torch.float32)),
    ]
    cpu = [
        ("adapter_layer_norm_fwd_cpu", (x, gamma, beta, 1e-5, torch.bfloat16)),
        ("adapter_layer_norm_bwd_cpu", (xhat, rstd, gamma, beta, dln, dres, torch.float32)),
        ("adapter_gelu_fwd_cpu", (z, (_randn(7, 24, seed=17) > 0).bfloat16(), 1.25)),
        ("adapter_gelu_bwd_cpu", (z, dh, None, 1.0)),
    ]
    needs_row_kernels = pytest.mark.skipif(adapter_ops._cpp_elementwise_problem() is not None,
                                           reason="llm2clip_fast._C built without the adapter row kernels")
    return triton + [pytest.param(name, args, marks=needs_row_kernels) for name, args in cpu]


@pytest.mark.parametrize(("name", "args"), _adapter_primitive_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_adapter_primitives(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args)


# ---- torch.compile(fullgraph=True) of a tiny model per public op ----------------------------------


def _compare_compiled(model: nn.Module, inputs: tuple[torch.Tensor, ...], atol=1e-5, rtol=1e-5,
                      backend="aot_eager", **compile_kw):
    """Eager and compiled (fullgraph) outputs and gradients (inputs and parameters) agree."""
    compiled = torch.compile(model, fullgraph=True, backend=backend, **compile_kw)
    leaves = [*(t for t in inputs if t.requires_grad), *model.parameters()]
    results = []
    for fn in (model, compiled):
        out = fn(*inputs)
        weight = torch.linspace(0.5, 1.5, out.numel(), device=out.device).reshape(out.shape)
        results.append((out.detach(), torch.autograd.grad((out * weight).sum(), leaves)))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, atol=atol, rtol=rtol)
    for got, want in zip(comp_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return compiled


class _TwoTower(nn.Module):
    """Projections into a shared space, a learnable log-scale (and bias), then the given loss module."""

    def __init__(self, loss: nn.Module, siglip: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(10, 11)
        self.text_proj = nn.Linear(9, 11)
        self.log_scale = nn.Parameter(torch.tensor(1.2))
        self.bias = nn.Parameter(torch.tensor(-2.0)) if siglip else None
        self.loss = loss

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img = nn.functional.normalize(self.image_proj(image), dim=-1)
        txt = nn.functional.normalize(self.text_proj(text), dim=-1)
        if self.bias is None:
            return self.loss(img, txt, self.log_scale.exp())
        return self.loss(img, txt, self.log_scale.exp(), self.bias)


LOSS_BACKENDS = [pytest.param("cpu", marks=needs_cpu_ops), "triton", "torch"]


def _tower_inputs(b=7):
    return _randn(b, 10, seed=11), _randn(b, 9, seed=12)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_clip_loss_module_compiles_fullgraph(backend):
    _compare_compiled(_TwoTower(ClipLoss(backend=backend)), _tower_inputs())


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_siglip_loss_module_compiles_fullgraph(backend):
    _compare_compiled(_TwoTower(SigLipLoss(backend=backend), siglip=True), _tower_inputs())


class _PerSampleLosses(nn.Module):
    """The functional ops with reduction='none' and features that carry gradients themselves."""

    def forward(self, image, text, scale, bias):
        clip = clip_ops.clip_loss(image, text, scale, reduction="none", backend="triton")
        sig = siglip_ops.siglip_loss(image, text, scale, bias, reduction="none", backend="triton")
        return torch.stack([clip, sig])


def test_functional_losses_per_sample_compile_fullgraph():
    image, text = (t.requires_grad_() for t in _loss_pair(6, 6, 11))
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    _compare_compiled(_PerSampleLosses(), (image, text, scale, bias))


@needs_cpu_ops
def test_clip_loss_compiles_once_for_dynamic_batch_sizes():
    model = _TwoTower(ClipLoss(backend="cpu"))
    compiled = _compare_compiled(model, _tower_inputs(7), dynamic=True)
    for b in (5, 12):
        image, text = _tower_inputs(b)
        torch.testing.assert_close(compiled(image, text), model(image, text), atol=1e-5, rtol=1e-5)


def test_compiled_loss_still_rejects_a_bad_logit_scale():
    # Under torch.compile the host-side value check becomes an asynchronous assertion.
    image, text = _loss_pair(5, 5, 11)
    fn = torch.compile(lambda s: clip_ops.clip_loss(image, text, s, backend="torch"), fullgraph=True,
                       backend="aot_eager")
    assert torch.isfinite(fn(torch.tensor(2.0)))
    with pytest.raises(RuntimeError, match="logit_scale must be positive and finite"):
        fn(torch.tensor(-2.0))


def test_backend_is_chosen_at_trace_time_and_a_refusal_names_its_reasons(monkeypatch):
    hidden, mask = _randn(2, 3, 4, seed=16), torch.ones(2, 3, dtype=torch.bool)
    monkeypatch.setenv("LLM2CLIP_BACKEND_MASKED_MEAN_POOL", "cuda")
    fn = torch.compile(lambda h, m: masked_mean_pool(h, m), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced but cannot serve"):
        fn(hidden, mask)
    torch._dynamo.reset()
    monkeypatch.setenv("LLM2CLIP_BACKEND_MASKED_MEAN_POOL", "torch")
    torch.testing.assert_close(fn(hidden, mask), hidden.mean(dim=1))
    assert _backend.last_selected("masked_mean_pool") == "torch"


class _Pooler(nn.Module):
    def __init__(self, backend: str, normalize: bool):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 13)
        self.backend = backend
        self.normalize = normalize

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean_pool(self.proj(hidden), mask, normalize=self.normalize, backend=self.backend)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_ops), "triton", "torch"])
@pytest.mark.parametrize("normalize", [False, True])
def test_masked_mean_pool_compiles_fullgraph(backend, normalize):
    hidden = _randn(3, 6, 8, seed=13).requires_grad_()
    mask = _randn(3, 6, seed=14) > 0
    mask[-1] = False  # an empty row
    _compare_compiled(_Pooler(backend, normalize), (hidden, mask))


@pytest.mark.parametrize("backend", ["triton", "lean", "torch", "recompute"])
def test_text_adapter_compiles_fullgraph(backend):
    torch.manual_seed(0)
    model = TextAdapter(12, 5, num_blocks=2, backend=backend)
    _compare_compiled(model, (_randn(7, 12, seed=15).requires_grad_(),), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "lean"])
def test_text_adapter_with_dropout_compiles_fullgraph(backend):
    # The dropout seeds are drawn inside the graph (torch.randint): with the generator reset before
    # each run, eager and compiled draw the same masks.
    torch.manual_seed(0)
    model = TextAdapter(12, 5, num_blocks=2, dropout=0.3, backend=backend).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _randn(7, 12, seed=15).requires_grad_()
    results = []
    for fn in (model, compiled):
        torch.manual_seed(1)
        out = fn(x)
        results.append((out, torch.autograd.grad(out.sum(), [x, *model.parameters()])))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, atol=1e-4, rtol=1e-4)
    for got, want in zip(comp_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_no_compiler_disable_left_in_the_ops():
    import inspect

    # Only the global-batch entry points (clip_loss_global / siglip_loss_global, which live with their
    # op) stay outside compiled graphs; the single-process ops compile whole.
    for module in (adapter_ops, clip_ops, siglip_ops):
        lines = inspect.getsource(module).splitlines()
        for i, line in enumerate(lines):
            assert "compiler.disable(" not in line, line  # no wrapping by call either
            if line.lstrip().startswith("@") and "compiler.disable" in line:
                decorated = next(x for x in lines[i + 1:] if x.lstrip().startswith("def "))
                assert "_global(" in decorated, decorated


def test_distributed_loss_is_outside_fullgraph_but_runs_with_graph_breaks():
    # The global-batch losses gather batch sizes to the host and call torch.distributed collectives
    # inside autograd Functions: they run eagerly (torch.compiler.disable, see distributed.py), so
    # fullgraph=True refuses, and plain torch.compile (a graph break there) gives the eager result.
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        image, text = _loss_pair(5, 5, 11)
        scale = torch.tensor(2.0)

        def global_loss(a, b):
            return clip_ops.clip_loss(a, b, scale, distributed=True, backend="torch")

        eager = global_loss(image, text)
        with pytest.raises(torch._dynamo.exc.Unsupported, match="clip_loss_global"):
            torch.compile(global_loss, fullgraph=True, backend="aot_eager")(image, text)
        torch._dynamo.reset()
        got = torch.compile(global_loss, backend="aot_eager")(image, text)
        torch.testing.assert_close(got, eager)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@needs_cpu_ops
def test_inductor_compiles_a_model_around_the_cpu_ops():
    # The one Inductor compile on CPU (about 10 s on 2 cores): C++ ops and their fakes, traced backward.
    torch._dynamo.reset()
    _compare_compiled(_TwoTower(ClipLoss(backend="cpu")), _tower_inputs(), backend="inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["clip", "siglip", "adapter", "pool_triton", "pool_cuda"])
def test_gpu_inductor_compiles_the_ops(case):
    # Inductor traces into the triton_op launchers (wrap_triton) and compiles around the kernels.
    torch._dynamo.reset()
    device = "cuda"
    if case in ("clip", "siglip"):
        loss = ClipLoss(backend="triton") if case == "clip" else SigLipLoss(backend="triton")
        model = _TwoTower(loss, siglip=case == "siglip").to(device)
        inputs = tuple(t.to(device) for t in _tower_inputs(37))
    elif case == "adapter":
        torch.manual_seed(0)
        model = TextAdapter(64, 32, num_blocks=2, backend="triton").to(device)
        inputs = (torch.randn(33, 64, device=device, requires_grad=True),)
    else:
        model = _Pooler(case.removeprefix("pool_"), normalize=True).to(device)
        inputs = (torch.randn(3, 17, 8, device=device, requires_grad=True),
                  torch.rand(3, 17, device=device) > 0.3)
    _compare_compiled(model, inputs, atol=1e-4, rtol=1e-4, backend="inductor")
