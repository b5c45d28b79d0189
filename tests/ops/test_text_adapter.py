"""Text adapter: architecture, state_dict interchange, input checks, dispatch, and every backend against
eager ``TextAdapterReference``.

The lean backends (``lean``: C++ row kernels or torch ops for the element-wise work; ``triton``: Triton
kernels, run here under the interpreter) are checked for the forward and every gradient: equal to eager
in float64 (lean), within 2x eager's own error against float64 under bf16 autocast, with dropout (the
eager reference is built with the very mask the backend drew from its seed), at odd batch sizes; and
their saved state is counted with ``saved_tensors_hooks``. Shapes are small and odd: 37 rows, d=40,
hidden 80, out 24.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference
from llm2clip_fast.ops import _backend
from llm2clip_fast.ops import adapter as adapter_ops
from llm2clip_fast.ops._backend import BackendUnavailableError, DispatchContext, TensorSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_CPP = adapter_ops._cpp_elementwise_problem() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="llm2clip_fast._C built without the adapter row kernels")
BF16 = torch.bfloat16


def _pair(in_dim: int, out_dim: int, num_blocks: int = 2, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    ref = TextAdapterReference(in_dim, out_dim, num_blocks=num_blocks, **kw)
    # Non-trivial LayerNorm affines, so their gradients and the normalisation path are exercised.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    fused = TextAdapter(in_dim, out_dim, num_blocks=num_blocks, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref.to(dtype), fused.to(dtype)


def _names(model):
    return ["x", *(n for n, _ in model.named_parameters())]


def _input(rows: int, d: int, device=DEVICE, dtype=torch.float32) -> torch.Tensor:
    # Offset and scale so the L2 norm and the row mean both matter.
    return (2.5 * torch.randn(rows, d, device=device) + 0.7).to(dtype).requires_grad_(True)


def _grads(model, x, gy):
    y = model(x)
    return y, torch.autograd.grad(y, [x, *model.parameters()], gy)


# ---------------------------------------------------------------------------------------------------
# Architecture and inputs.


def test_parameter_count_matches_architecture():
    d, h, n, blocks = 4096, 2 * 4096, 1280, 4
    per_block = (2 * d) + (d * h + h) + (h * d + d)  # LayerNorm, Linear(d->h), Linear(h->d)
    expected = blocks * per_block + 2 * d + (d * n + n)  # final LayerNorm, projection
    with torch.device("meta"):
        fused = TextAdapter(4096, 1280)
        ref = TextAdapterReference(4096, 1280)
    assert expected == 273_769_728
    assert sum(p.numel() for p in fused.parameters()) == expected
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_state_dict_interchange_both_ways():
    ref, fused = _pair(40, 24, num_blocks=3, seed=1)
    assert list(ref.state_dict()) == list(fused.state_dict())
    x = torch.randn(5, 40)
    back = TextAdapterReference(40, 24, num_blocks=3)
    back.load_state_dict(fused.state_dict())
    torch.testing.assert_close(back(x), ref(x))
    torch.testing.assert_close(fused(x), ref(x))


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (torch.randn(4, 41), ValueError, "last dimension in_dim=40"),
        (torch.randn(2, 4, 40), ValueError, "rank 2"),
        (torch.randn(40), ValueError, "rank 2"),
        (torch.ones(4, 40, dtype=torch.int64), TypeError, "floating-point"),
        ([[0.0] * 40], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_error(bad, exc, match):
    _, fused = _pair(40, 24, num_blocks=1)
    with pytest.raises(exc, match=match):
        fused(bad)


def test_bad_constructor_and_op_arguments():
    with pytest.raises(ValueError, match="in_dim"):
        TextAdapter(0, 8)
    with pytest.raises(ValueError, match="dropout"):
        TextAdapter(8, 8, dropout=1.5)
    with pytest.raises(ValueError, match="num_blocks"):
        TextAdapter(8, 8, num_blocks=-1)
    with pytest.raises(ValueError, match="input_norm"):
        TextAdapter(8, 8, input_norm="layer")
    probe = adapter_ops._probe(torch.device("cpu"), torch.float32)
    blocks, head = [probe[1:7]], probe[7:]
    with pytest.raises(ValueError, match="ln_eps must be a float > 0"):
        adapter_ops.text_adapter(probe[0], blocks, head, ln_eps=0.0)
    with pytest.raises(ValueError, match=r"block_weights\[0\].w1 must have shape"):
        adapter_ops.text_adapter(probe[0], [(*probe[1:3], probe[3][:, :5], *probe[4:7])], head)
    with pytest.raises(ValueError, match="dropout must be a float in"):
        adapter_ops.text_adapter(probe[0], blocks, head, dropout=1.0)


@pytest.mark.parametrize("backend", ["lean", "torch"])
def test_input_norm_none_skips_only_the_l2_step(backend):
    """input_norm="none" is the same adapter fed the raw input; "l2" equals "none" on pre-normalised rows."""
    ref, fused = _pair(40, 24, num_blocks=2, seed=3, input_norm="none")
    fused.backend = backend
    x = 7.0 * torch.randn(9, 40)
    l2 = TextAdapterReference(40, 24, num_blocks=2)
    l2.load_state_dict(ref.state_dict())
    with torch.no_grad():
        h = x
        for block in ref.blocks:
            h = h + block.fc2(F.gelu(block.fc1(F.layer_norm(h, (40,), block.norm.weight, block.norm.bias))))
        expected = ref.proj(F.layer_norm(h, (40,), ref.final_norm.weight, ref.final_norm.bias))
        torch.testing.assert_close(ref(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        unit = F.normalize(x, dim=-1)
        torch.testing.assert_close(fused(unit), l2(x), rtol=1e-5, atol=1e-5)
        assert (fused(x) - l2(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# Dispatch.


def test_cpu_dispatch_picks_lean_for_float32_and_bfloat16_and_torch_otherwise(monkeypatch):
    for var in ("LLM2CLIP_BACKEND", "LLM2CLIP_BACKEND_TEXT_ADAPTER"):
        monkeypatch.delenv(var, raising=False)
    for dtype, want in ((torch.float32, "lean"), (BF16, "lean"), (torch.float16, "torch"),
                        (torch.float64, "torch")):
        probe = adapter_ops._probe(torch.device("cpu"), dtype)
        got = _backend.select_backend("text_adapter", probe, options={"compute_dtype": dtype}).name
        assert got == (want if HAS_CPP else "torch"), dtype
    probe = adapter_ops._probe(torch.device("cpu"), torch.float32)
    # fp32 tensors under fp16 autocast: the products would be fp16, which the C++ kernels do not take.
    fp16_products = {"compute_dtype": torch.float16}
    assert _backend.select_backend("text_adapter", probe, options=fp16_products).name == "torch"
    reasons = dict(_backend.explain("text_adapter", probe))
    assert any("only when forced" in r for r in reasons["recompute"])
    assert _backend.select_backend("text_adapter", probe, backend="recompute").name == "recompute"
    with pytest.raises(BackendUnavailableError, match="recompute"):
        _backend.select_backend("text_adapter", [probe[0].long(), *probe[1:]], backend="recompute")


def test_cuda_dispatch_keeps_eager_until_a_gpu_measurement(monkeypatch):
    """On CUDA the lean Functions serve only when forced (checked with tensor descriptions: no GPU here)."""
    monkeypatch.setattr(adapter_ops, "triton_kernel_reasons", lambda ctx, module: [])
    monkeypatch.setattr(adapter_ops, "kernel_module_problem", lambda module: None)
    cuda = torch.device("cuda")
    probe = adapter_ops._probe(torch.device("meta"), BF16)
    specs = tuple(TensorSpec(tuple(t.shape), t.dtype, cuda) for t in probe)
    op = _backend.registered_ops()["text_adapter"]
    for name in ("triton", "lean"):
        why = op.get(name).not_supported_reasons(DispatchContext(specs, forced=False))
        assert any("bench/adapter_throughput.py" in r for r in why), (name, why)
        assert op.get(name).not_supported_reasons(DispatchContext(specs, forced=True)) == []
    assert op.get("torch").not_supported_reasons(DispatchContext(specs)) == []


def test_forced_triton_refuses_a_float64_input_with_its_reason():
    _, fused = _pair(40, 24, num_blocks=1, dtype=torch.float64)
    fused.backend = "triton"
    with pytest.raises(BackendUnavailableError, match=r"dtype torch\.float64 not supported"):
        fused(torch.randn(3, 40, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# Every backend against eager: float64 equality, dropout with the same mask.


def _lean_impls():
    impls = [pytest.param("lean-torch", id="lean-torch")]
    impls.append(pytest.param("lean-cpp", id="lean-cpp", marks=needs_cpp))
    impls.append(pytest.param("triton", id="triton"))
    return impls


def _use(impl: str, model, monkeypatch) -> None:
    """Point ``model`` at the backend ``impl`` names; "lean-torch" hides the C++ kernels."""
    model.backend = "triton" if impl == "triton" else "lean"
    if impl == "lean-torch":
        monkeypatch.setattr(adapter_ops, "_CPP_PROBLEM", "hidden by the test")


def _dropout_reference(ref, x, masks, p):
    """Eager TextAdapterReference's formula with given dropout keep masks (one per block)."""
    h = F.normalize(x, dim=-1)
    for block, keep in zip(ref.blocks, masks):
        a = F.gelu(block.fc1(block.norm(h)))
        if keep is not None:
            a = a * keep.to(a.dtype) / (1 - p)
        h = h + block.fc2(a)
    return ref.proj(ref.final_norm(h))


def _masks_for(backend: str, seed: int, blocks: int, rows: int, hidden: int, p: float, dtype, device):
    """The masks ``backend`` draws after torch.manual_seed(seed): one seed per block, as the op does."""
    torch.manual_seed(seed)
    seeds = [adapter_ops.draw_dropout_seed(torch.device(device)) for _ in range(blocks)]
    return [adapter_ops.dropout_keep_mask(s, rows, hidden, p, dtype, backend=backend) for s in seeds]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["lean", "recompute", "torch"])
def test_float64_forward_and_every_gradient_equal_eager(backend, dropout):
    ref, fused = _pair(40, 24, num_blocks=2, seed=5, dtype=torch.float64, dropout=dropout)
    fused.backend = backend
    ref.train(), fused.train()
    x = _input(37, 40, device="cpu", dtype=torch.float64)
    gy = torch.randn(37, 24, dtype=torch.float64)
    torch.manual_seed(11)
    y, g = _grads(fused, x, gy)
    assert _backend.last_selected("text_adapter") == backend
    if dropout and backend == "lean":
        masks = _masks_for("lean", 11, 2, 37, 80, dropout, torch.float64, "cpu")
        y_ref = _dropout_reference(ref, x, masks, dropout)
        g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    else:
        torch.manual_seed(11)  # torch/recompute draw their masks as eager F.dropout does
        y_ref, g_ref = _grads(ref, x, gy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for name, a, b in zip(_names(ref), g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", _lean_impls())
@pytest.mark.parametrize("rows", [37, 1])
def test_lean_fp32_forward_and_every_gradient_match_eager_with_dropout(impl, rows, monkeypatch):
    p = 0.25
    ref, fused = _pair(40, 24, num_blocks=2, seed=7, dropout=p)
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    _use(impl, fused, monkeypatch)
    fused.train()
    x = _input(rows, 40)
    gy = torch.randn(rows, 24, device=DEVICE)
    torch.manual_seed(3)
    y, g = _grads(fused, x, gy)
    masks = _masks_for("triton" if impl == "triton" else "lean", 3, 2, rows, 80, p, torch.float32, DEVICE)
    assert all(0 < m.mean() < 1 for m in masks) or rows == 1
    y_ref = _dropout_reference(ref, x, masks, p)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    # The interpreter's fp32 dot is exact and the CPU's GEMMs are fp32: summation order only.
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    for name, a, b in zip(_names(ref), g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5 * max(b.abs().max().item(), 1.0), rtol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_acts_only_in_training_and_each_call_draws_a_new_mask():
    _, fused = _pair(64, 16, num_blocks=1, dropout=0.25)
    x = torch.randn(3, 64)
    fused.train()
    torch.manual_seed(0)
    a = fused(x)
    torch.manual_seed(0)
    torch.testing.assert_close(fused(x), a, atol=0, rtol=0)  # the seed comes from torch's generator
    assert not torch.allclose(fused(x), a)
    fused.eval()
    torch.testing.assert_close(fused(x), fused(x))


# ---------------------------------------------------------------------------------------------------
# bf16 autocast: within twice eager's own error against float64.


def _assert_within_twice_eager(name, got, eager, ref64):
    # The error's norm over the whole tensor: a max over a few dozen bf16 roundings is a noisy statistic.
    err = (got.double() - ref64).norm().item()
    err_eager = (eager.double() - ref64).norm().item()
    assert err <= 2 * err_eager + 1e-6 * ref64.norm().item(), (
        f"{name}: error {err:.3g} > 2 x eager's bf16 error {err_eager:.3g}")


@pytest.mark.parametrize("impl", _lean_impls())
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bf16_autocast_error_at_most_twice_eager(impl, dropout, monkeypatch):
    ref, fused = _pair(40, 24, num_blocks=2, seed=9, dropout=dropout)
    ref64 = TextAdapterReference(40, 24, num_blocks=2, dropout=dropout)
    ref64.load_state_dict(ref.state_dict())
    ref, fused, ref64 = ref.to(DEVICE), fused.to(DEVICE), ref64.to(DEVICE, torch.float64)
    _use(impl, fused, monkeypatch)
    for m in (ref, fused, ref64):
        m.train()
    x = _input(37, 40)
    gy = torch.randn(37, 24, device=DEVICE)
    torch.manual_seed(4)
    with torch.autocast(DEVICE, dtype=BF16):
        y, g = _grads(fused, x, gy.to(BF16))
    assert y.dtype == BF16 and all(t.dtype == torch.float32 for t in g)
    backend = "triton" if impl == "triton" else "lean"
    masks = _masks_for(backend, 4, 2, 37, 80, dropout, torch.float32, DEVICE) if dropout else [None, None]
    p = dropout
    x64 = x.detach().double().requires_grad_()
    y64 = _dropout_reference(ref64, x64, masks, p)
    g64 = torch.autograd.grad(y64, [x64, *ref64.parameters()], gy.double())
    with torch.autocast(DEVICE, dtype=BF16):
        y_eager = _dropout_reference(ref, x, masks, p)
    g_eager = torch.autograd.grad(y_eager, [x, *ref.parameters()], gy.to(BF16))
    _assert_within_twice_eager("output", y, y_eager, y64)
    for name, a, b, c in zip(_names(ref), g, g_eager, g64):
        _assert_within_twice_eager(name, a, b, c)


@pytest.mark.parametrize("impl", ["lean-cpp", "triton"])
def test_bf16_weights_without_autocast_error_at_most_twice_eager(impl, monkeypatch):
    if impl == "lean-cpp" and not HAS_CPP:
        pytest.skip("llm2clip_fast._C built without the adapter row kernels")
    ref32, fused = _pair(40, 24, num_blocks=1, seed=13)
    ref_low = TextAdapterReference(40, 24, num_blocks=1)
    ref_low.load_state_dict(ref32.state_dict())
    ref64 = TextAdapterReference(40, 24, num_blocks=1).to(torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    ref_low, fused, ref64 = ref_low.to(DEVICE, BF16), fused.to(DEVICE, BF16), ref64.to(DEVICE)
    _use(impl, fused, monkeypatch)
    x = _input(37, 40, dtype=BF16)
    gy = torch.randn(37, 24, device=DEVICE)
    y, g = _grads(fused, x, gy.to(BF16))
    y_low, g_low = _grads(ref_low, x, gy.to(BF16))
    x64 = x.detach().double().requires_grad_()
    y64, g64 = _grads(ref64, x64, gy.double())
    assert y.dtype == BF16
    _assert_within_twice_eager("output", y, y_low, y64)
    for name, a, b, c in zip(_names(ref64), g, g_low, g64):
        _assert_within_twice_eager(name, a, b, c)


# ---------------------------------------------------------------------------------------------------
# Saved state.


def _saved(model, x, autocast: bool):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(x.device.type, dtype=BF16, enabled=autocast):
            y = model(x)
    params = {p.data_ptr() for p in model.parameters()}
    distinct = {t.untyped_storage().data_ptr(): t for t in saved if t.data_ptr() not in params}
    return y, list(distinct.values())


@pytest.mark.parametrize("impl", _lean_impls())
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_saves_xhat_and_z_in_16_bit_rstd_and_a_seed(impl, dropout, monkeypatch):
    """Per block: xhat (B, d) and z (B, h) in bf16, rstd (B,) fp32, with dropout one int64 seed; the
    head: xhat and rstd. The cached input needs no gradient (stage 2), so nothing of it is kept."""
    b, d, h, blocks = 37, 40, 80, 2
    _, fused = _pair(d, 24, num_blocks=blocks, seed=15, dropout=dropout)
    fused = fused.to(DEVICE).train()
    _use(impl, fused, monkeypatch)
    x = torch.randn(b, d, device=DEVICE)
    _, tensors = _saved(fused, x, autocast=True)
    seeds = blocks if dropout else 0
    expected = blocks * (b * d * 2 + b * 4 + b * h * 2) + seeds * 8 + (b * d * 2 + b * 4)
    got = sum(t.numel() * t.element_size() for t in tensors)
    assert got == expected, [(t.shape, t.dtype) for t in tensors]
    assert sorted({t.dtype for t in tensors}, key=str) == sorted(
        {BF16, torch.float32} | ({torch.int64} if dropout else set()), key=str)
    # Eager keeps per block the fp32 input, its LayerNorm's fp32 mean and rstd, the bf16 LayerNorm
    # output, z and GELU(z): 14d + 8 bytes per row (weight casts aside) against the lean 6d + 4.
    ref = TextAdapterReference(d, 24, num_blocks=blocks).to(DEVICE)
    _, eager = _saved(ref, x, autocast=True)
    weight_shapes = {tuple(p.shape) for p in ref.parameters()}
    acts = [t for t in eager if tuple(t.shape) not in weight_shapes or t.shape[0] == b]
    eager_bytes = sum(t.numel() * t.element_size() for t in acts if t.dim() == 2 and t.shape[0] == b)
    assert eager_bytes == blocks * b * (14 * d + 8) + b * (6 * d + 8)
    assert expected - seeds * 8 <= 0.5 * eager_bytes


def test_lean_without_grad_saves_nothing_and_computes_the_same():
    _, fused = _pair(40, 24, num_blocks=2, seed=17)
    x = torch.randn(9, 40)
    y = fused(x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), y, atol=0, rtol=0)
    _, tensors = _saved(fused, x, autocast=False)
    assert _backend.last_selected("text_adapter") == ("lean" if HAS_CPP else "torch")
    assert all(t.dim() <= 2 for t in tensors)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recompute_matches_torch_exactly_and_saves_block_inputs_only(dropout):
    _, eager = _pair(40, 24, num_blocks=3, seed=21, dropout=dropout)
    _, recompute = _pair(40, 24, num_blocks=3, seed=21, dropout=dropout)
    eager.backend, recompute.backend = "torch", "recompute"
    eager.train(), recompute.train()
    x = _input(37, 40, device="cpu")
    gy = torch.randn(37, 24)
    torch.manual_seed(5)
    y_eager, saved_eager = _saved(eager, x, autocast=False)
    g_eager = torch.autograd.grad(y_eager, [x, *eager.parameters()], gy)
    torch.manual_seed(5)  # same dropout masks in forward; the recompute must replay them
    y, saved = _saved(recompute, x, autocast=False)
    assert _backend.last_selected("text_adapter") == "recompute"
    g = torch.autograd.grad(y, [x, *recompute.parameters()], gy)
    torch.testing.assert_close(y, y_eager, atol=0, rtol=0)
    for name, a, b in zip(_names(eager), g, g_eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    shapes, shapes_eager = [tuple(t.shape) for t in saved], [tuple(t.shape) for t in saved_eager]
    # eager keeps (37, 80) hidden activations; recompute only the input, what F.normalize saves of it,
    # the normalised input and the residual stream after each of the 3 blocks
    assert (37, 80) in shapes_eager
    assert all(s in {(37, 40), (37, 1)} for s in shapes), shapes
    assert sum(s == (37, 40) for s in shapes) <= 6 < sum(s == (37, 40) for s in shapes_eager)


def test_recompute_without_grad_builds_no_checkpoints():
    _, model = _pair(40, 24, num_blocks=2, seed=22)
    model.backend = "recompute"
    x = torch.randn(5, 40)
    with torch.no_grad():
        y = model(x)
    model.backend = "torch"
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# The element-wise primitives themselves, against torch's formulas.


@needs_cpp
@pytest.mark.parametrize(("x_dtype", "cd"),
                         [(torch.float32, torch.float32), (torch.float32, BF16), (BF16, BF16)])
def test_cpp_row_kernels_match_the_torch_ops(x_dtype, cd):
    torch.manual_seed(23)
    cpp, ref = adapter_ops._CppElementwise, adapter_ops._TorchElementwise
    x = (2 * torch.randn(37, 41) + 0.5).to(x_dtype)
    gamma, beta = 1 + 0.3 * torch.randn(41), 0.3 * torch.randn(41)
    got, want = cpp.layer_norm_fwd(x, gamma, beta, 1e-5, cd), ref.layer_norm_fwd(x, gamma, beta, 1e-5, cd)
    ulp = 1e-2 if cd == BF16 else 1e-5
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=ulp, rtol=ulp)
    xhat, rstd, _ = want
    dln, dres = torch.randn(37, 41).to(cd), torch.randn(37, 41).to(x_dtype)
    for res in (dres, None):
        got = cpp.layer_norm_bwd(xhat, rstd, gamma, beta, dln, res, x_dtype)
        want = ref.layer_norm_bwd(xhat, rstd, gamma, beta, dln, res, x_dtype)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), atol=ulp * 10, rtol=ulp)
    z, dh = torch.randn(37, 83).to(cd), torch.randn(37, 83).to(cd)
    seed = torch.tensor([1234])
    for s in (None, seed):
        torch.testing.assert_close(cpp.gelu_dropout_fwd(z, s, 0.3).float(),
                                   ref.gelu_dropout_fwd(z, s, 0.3).float(), atol=ulp, rtol=ulp)
        for a, b in zip(cpp.gelu_dropout_bwd(z, dh, s, 0.3), ref.gelu_dropout_bwd(z, dh, s, 0.3)):
            torch.testing.assert_close(a.float(), b.float(), atol=ulp * 10, rtol=ulp)


@pytest.mark.parametrize("cd", [torch.float32, BF16])
def test_triton_kernels_match_the_torch_ops(cd):
    from llm2clip_fast.kernels import adapter as K

    torch.manual_seed(29)
    ref = adapter_ops._TorchElementwise
    x = (2 * torch.randn(37, 41, device=DEVICE) + 0.5)
    gamma, beta = 1 + 0.3 * torch.randn(41, device=DEVICE), 0.3 * torch.randn(41, device=DEVICE)
    ulp = 1e-2 if cd == BF16 else 1e-5
    got, want = K.layer_norm_fwd(x, gamma, beta, 1e-5, cd), ref.layer_norm_fwd(x, gamma, beta, 1e-5, cd)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=ulp, rtol=ulp)
    xhat, rstd, _ = want
    dln, dres = torch.randn(37, 41, device=DEVICE).to(cd), torch.randn(37, 41, device=DEVICE)
    for res in (dres, None):
        for a, b in zip(K.layer_norm_bwd(xhat, rstd, gamma, beta, dln, res, torch.float32),
                        ref.layer_norm_bwd(xhat, rstd, gamma, beta, dln, res, torch.float32)):
            torch.testing.assert_close(a.float(), b.float(), atol=ulp * 10, rtol=ulp)
    z, dh = torch.randn(37, 83, device=DEVICE).to(cd), torch.randn(37, 83, device=DEVICE).to(cd)
    seed = torch.tensor([99], device=DEVICE)
    keep = K.keep_mask(seed, 37, 83, 0.3, torch.float32)
    assert set(keep.unique().tolist()) == {0.0, 1.0} and 0.55 < keep.mean() < 0.85
    torch.testing.assert_close(K.gelu_dropout_fwd(z, seed, 0.3).float(),
                               F.gelu(z.float()) * keep / 0.7, atol=ulp * 2, rtol=ulp)
    dz, h, dz_sum = K.gelu_dropout_bwd(z, dh, seed, 0.3)
    want_dz = torch.ops.aten.gelu_backward(dh.float() * keep / 0.7, z.float())
    torch.testing.assert_close(dz.float(), want_dz, atol=ulp * 2, rtol=ulp)
    torch.testing.assert_close(h.float(), F.gelu(z.float()) * keep / 0.7, atol=ulp * 2, rtol=ulp)
    torch.testing.assert_close(dz_sum, dz.float().sum(0), atol=1e-4, rtol=1e-4)


def test_empty_batch_runs_on_every_backend():
    _, fused = _pair(40, 24, num_blocks=1, seed=31)
    for backend in ("lean", "triton", "torch", "recompute"):
        fused.backend = backend
        x = torch.randn(0, 40, requires_grad=True)
        y = fused(x)
        assert y.shape == (0, 24)
        y.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "lean"])
@pytest.mark.parametrize("weights_dtype", [torch.float32, BF16])
def test_gpu_bf16_autocast_error_at_most_twice_eager(backend, weights_dtype):
    ref32, fused = _pair(1000, 312, num_blocks=4, seed=17, dropout=0.1)
    ref_low = TextAdapterReference(1000, 312, num_blocks=4)
    ref_low.load_state_dict(ref32.state_dict())
    ref64 = TextAdapterReference(1000, 312, num_blocks=4).to(torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    ref64, ref_low, fused = ref64.cuda(), ref_low.cuda().to(weights_dtype), fused.cuda().to(weights_dtype)
    fused.backend = backend
    fused.eval()
    x = _input(1237, 1000, device="cuda", dtype=weights_dtype)
    gy = torch.randn(1237, 312, device="cuda")
    x64 = x.detach().double().requires_grad_()
    y64, g64 = _grads(ref64, x64, gy.double())
    with torch.autocast("cuda", dtype=BF16):
        y_low, g_low = _grads(ref_low, x, gy.to(BF16))
        y, g = _grads(fused, x, gy.to(BF16))
    assert y.dtype == BF16
    _assert_within_twice_eager("output", y, y_low, y64)
    for name, a, b, c in zip(_names(ref64), g, g_low, g64):
        _assert_within_twice_eager(name, a, b, c)
