"""Text adapter: architecture, state_dict interchange, input checks, torch path and fused kernels.

Fused-kernel tests run the Triton kernels under the interpreter (conftest sets TRITON_INTERPRET=1 when
there is no GPU) at small odd sizes: rows not a multiple of the block, d not a power of two.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference
from llm2clip_fast.ops import _backend
from llm2clip_fast.ops import adapter as adapter_ops
from llm2clip_fast.ops._backend import BackendUnavailableError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="in_dim"):
        TextAdapter(0, 8)
    with pytest.raises(ValueError, match="dropout"):
        TextAdapter(8, 8, dropout=1.5)
    with pytest.raises(ValueError, match="num_blocks"):
        TextAdapter(8, 8, num_blocks=-1)
    with pytest.raises(ValueError, match="input_norm"):
        TextAdapter(8, 8, input_norm="layer")


def test_input_norm_none_skips_only_the_l2_step():
    """input_norm="none" is the same adapter fed the raw input; "l2" equals "none" on pre-normalised rows."""
    ref, fused = _pair(40, 24, num_blocks=2, seed=3, input_norm="none")
    x = 7.0 * torch.randn(9, 40)
    l2 = TextAdapterReference(40, 24, num_blocks=2)
    l2.load_state_dict(ref.state_dict())
    with torch.no_grad():
        h = x
        for block in ref.blocks:
            h = h + block.fc2(F.gelu(block.fc1(F.layer_norm(h, (40,), block.norm.weight, block.norm.bias))))
        expected = ref.proj(F.layer_norm(h, (40,), ref.final_norm.weight, ref.final_norm.bias))
        torch.testing.assert_close(ref(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-6)
        unit = F.normalize(x, dim=-1)
        torch.testing.assert_close(fused(unit), l2(x), rtol=0, atol=1e-6)
        assert (fused(x) - l2(x)).abs().max() > 1e-3


def test_dropout_refuses_forced_triton_with_reason():
    _, fused = _pair(40, 24, num_blocks=1, dropout=0.1)
    fused.backend = "triton"
    fused.train()
    with pytest.raises(BackendUnavailableError, match="dropout"):
        fused(torch.randn(3, 40))
    probe = adapter_ops._probe(torch.device("cpu"), torch.float32)
    rows = dict(_backend.explain("text_adapter_dropout", probe))
    assert any("dropout" in why for why in rows["triton"])


def test_cpu_dispatch_picks_torch_and_dropout_is_visible():
    x = torch.randn(3, 64)
    probe = adapter_ops._probe(torch.device("cpu"), torch.float32)
    assert _backend.select_backend("text_adapter", probe).name == "torch"
    assert _backend.select_backend("text_adapter_dropout", probe).name == "torch"
    _, fused = _pair(64, 16, num_blocks=1, dropout=0.25)
    fused.train()
    torch.manual_seed(0)
    a = fused(x)
    torch.manual_seed(1)
    b = fused(x)
    assert not torch.allclose(a, b)  # dropout really acts in training
    fused.eval()
    torch.testing.assert_close(fused(x), fused(x))


def test_torch_path_matches_reference_with_grads():
    ref, fused = _pair(40, 24, num_blocks=2, seed=3)
    x = torch.randn(37, 40, requires_grad=True)
    y_ref, y = ref(x), fused(x)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    g = torch.autograd.grad(y, [x, *fused.parameters()], gy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# recompute backend: the torch formula under per-block activation checkpointing.


def _saved_activations(model, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    # distinct storages: one tensor saved by two autograd nodes costs its memory once
    distinct = {t.data_ptr(): tuple(t.shape) for t in saved if t.data_ptr() not in param_ptrs}
    return y, list(distinct.values())


def test_recompute_serves_only_when_forced():
    probe = adapter_ops._probe(torch.device("cpu"), torch.float32)
    reasons = dict(_backend.explain("text_adapter", probe))
    assert any("only when forced" in r for r in reasons["recompute"])
    assert _backend.select_backend("text_adapter", probe, backend="recompute").name == "recompute"
    with pytest.raises(BackendUnavailableError, match="recompute"):
        _backend.select_backend("text_adapter", [probe[0].long(), *probe[1:]], backend="recompute")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recompute_matches_torch_exactly_and_saves_block_inputs_only(dropout):
    _, eager = _pair(40, 24, num_blocks=3, seed=21, dropout=dropout)
    _, recompute = _pair(40, 24, num_blocks=3, seed=21, dropout=dropout)
    eager.backend, recompute.backend = "torch", "recompute"
    eager.train(), recompute.train()
    x = _input(37, 40, device="cpu")
    gy = torch.randn(37, 24)
    torch.manual_seed(5)
    y_eager, shapes_eager = _saved_activations(eager, x)
    g_eager = torch.autograd.grad(y_eager, [x, *eager.parameters()], gy)
    torch.manual_seed(5)  # same dropout masks in forward; the recompute must replay them
    y, shapes = _saved_activations(recompute, x)
    assert _backend.last_selected("text_adapter") == "recompute"
    g = torch.autograd.grad(y, [x, *recompute.parameters()], gy)
    torch.testing.assert_close(y, y_eager, atol=0, rtol=0)
    for name, a, b in zip(_names(eager), g, g_eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    # eager keeps (37, 80) hidden activations; recompute keeps nothing hidden-sized: the input and what
    # F.normalize saves of it, the normalised input and the residual stream after each of the 3 blocks
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
# Fused Triton path (interpreter on CPU). Sizes: 37 rows (block 32), d=40, hidden 80, out 24.


def _grads(model, x, gy):
    y = model(x)
    return y, torch.autograd.grad(y, [x, *model.parameters()], gy)


def _names(model):
    return ["x", *(n for n, _ in model.named_parameters())]


def _input(rows: int, d: int, device=DEVICE) -> torch.Tensor:
    # Offset and scale so the L2 norm and the row mean both matter.
    return (2.5 * torch.randn(rows, d, device=device) + 0.7).requires_grad_(True)


def test_fused_fp32_forward_and_every_gradient():
    ref, fused = _pair(40, 24, num_blocks=2, seed=5)
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    fused.backend = "triton"
    x = _input(37, 40)
    gy = torch.randn(37, 24, device=DEVICE)
    y_ref, g_ref = _grads(ref, x, gy)
    y, g = _grads(fused, x, gy)
    # The interpreter's fp32 dot is exact (a GPU uses TF32 only when torch allows it for matmuls).
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(_names(ref), g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1.0), rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _assert_within_twice_torch(name, fused, torch_low, ref32):
    err = (fused.float() - ref32).abs().max().item()
    err_torch = (torch_low.float() - ref32).abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * ref32.abs().max().item(), (
        f"{name}: fused error {err:.3g} > 2 x torch error {err_torch:.3g}")


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_fused_low_precision_weights_error_at_most_twice_torch(low):
    ref32, fused = _pair(40, 24, num_blocks=1, seed=7)
    ref_low = TextAdapterReference(40, 24, num_blocks=1)
    ref_low.load_state_dict(ref32.state_dict())
    ref32, ref_low, fused = ref32.to(DEVICE), ref_low.to(DEVICE, low), fused.to(DEVICE, low)
    fused.backend = "triton"
    x = _input(37, 40)
    gy = torch.randn(37, 24, device=DEVICE)
    y32, g32 = _grads(ref32, x, gy)
    y_low, g_low = _grads(ref_low, x, gy.to(low))
    y, g = _grads(fused, x, gy.to(low))
    assert y.dtype == low
    _assert_within_twice_torch("output", y, y_low, y32)
    for name, a, b, c in zip(_names(ref32), g, g_low, g32):
        _assert_within_twice_torch(name, a, b, c)


def test_fused_autocast_bf16_with_fp32_weights():
    # nn.Linear semantics: GEMM operands in bf16, LayerNorm / residual stream in fp32, bf16 output.
    ref, fused = _pair(40, 24, num_blocks=1, seed=9)
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    fused.backend = "triton"
    x = _input(37, 40)
    gy = torch.randn(37, 24, device=DEVICE)
    y32, g32 = _grads(ref, x, gy)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_low, g_low = _grads(ref, x, gy.bfloat16())
        y, g = _grads(fused, x, gy.bfloat16())
    assert y.dtype == y_low.dtype == torch.bfloat16
    assert all(a.dtype == torch.float32 for a in g)
    _assert_within_twice_torch("output", y, y_low, y32)
    for name, a, b, c in zip(_names(ref), g, g_low, g32):
        _assert_within_twice_torch(name, a, b, c)


def test_fused_without_blocks_folds_l2_into_the_head_layernorm():
    ref, fused = _pair(40, 24, num_blocks=0, seed=11)
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    fused.backend = "triton"
    x = _input(21, 40)
    gy = torch.randn(21, 24, device=DEVICE)
    y_ref, g_ref = _grads(ref, x, gy)
    y, g = _grads(fused, x, gy)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1.0), rtol=1e-4)


def test_row_stats_and_layernorm_bwd_kernels_with_l2_fold():
    from llm2clip_fast.kernels import adapter as K

    torch.manual_seed(13)
    x = 3.0 * torch.randn(19, 40, device=DEVICE) + 1.0
    x[4] = 0.0  # norm below eps: F.normalize's clamp is active, its gradient has no radial part
    x[5] *= 1e-14
    x.requires_grad_(True)
    gamma = (1 + 0.2 * torch.randn(40, device=DEVICE)).requires_grad_(True)
    beta = (0.2 * torch.randn(40, device=DEVICE)).requires_grad_(True)
    dres = torch.randn(19, 40, device=DEVICE)
    dln = torch.randn(19, 40, device=DEVICE)
    x0 = F.normalize(x, dim=-1, eps=1e-12)
    y = F.layer_norm(x0, (40,), gamma, beta, 1e-5)
    gx, gg, gb = torch.autograd.grad([y, x0], [x, gamma, beta], [dln, dres])

    xd = x.detach()
    mean, rstd, norm = K.row_stats(xd, 1e-5, 1e-12)
    torch.testing.assert_close(norm, xd.norm(dim=-1))
    ln = (xd - mean[:, None]) * rstd[:, None] * gamma.detach() + beta.detach()
    torch.testing.assert_close(ln, y.detach(), atol=1e-5, rtol=1e-5)
    dx, dg, db = K.layernorm_bwd(xd, mean, rstd, gamma.detach(), dln, dres=dres, norm=norm, l2_eps=1e-12)
    torch.testing.assert_close(dx, gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dg, gg, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, gb, rtol=1e-4, atol=1e-4)


def test_fused_saves_no_hidden_sized_activation():
    _, fused = _pair(40, 24, num_blocks=2, seed=15)
    fused = fused.to(DEVICE)
    fused.backend = "triton"
    x = _input(37, 40)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused(x)
    with torch.no_grad():  # inference keeps nothing and computes the same
        torch.testing.assert_close(fused(x), y, atol=0, rtol=0)
    param_ptrs = {p.data_ptr() for p in fused.parameters()}
    activations = [t for t in saved if t.data_ptr() not in param_ptrs]
    # The input, one residual-stream tensor per later block, fp32 row statistics: nothing (37, 80).
    shapes = [tuple(t.shape) for t in activations]
    assert all(s in {(37, 40), (37,)} for s in shapes), shapes
    assert sum(tuple(t.shape) == (37, 40) for t in activations) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_gpu_bf16_autocast_matches_reference(weights_dtype):
    ref32, fused = _pair(1000, 312, num_blocks=4, seed=17)
    ref_low = TextAdapterReference(1000, 312, num_blocks=4)
    ref_low.load_state_dict(ref32.state_dict())
    ref32, ref_low, fused = ref32.cuda(), ref_low.cuda().to(weights_dtype), fused.cuda().to(weights_dtype)
    probe = adapter_ops._probe(torch.device("cuda"), torch.bfloat16)
    # Automatic dispatch takes torch on CUDA (faster on the H200); the fused path serves when forced.
    assert _backend.select_backend("text_adapter", probe).name == "torch"
    fused.backend = "triton"
    x = _input(1237, 1000, device="cuda")
    gy = torch.randn(1237, 312, device="cuda")
    y32, g32 = _grads(ref32, x, gy)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_low, g_low = _grads(ref_low, x, gy.bfloat16())
        y, g = _grads(fused, x, gy.bfloat16())
    assert y.dtype == torch.bfloat16
    _assert_within_twice_torch("output", y, y_low, y32)
    for name, a, b, c in zip(_names(ref32), g, g_low, g32):
        _assert_within_twice_torch(name, a, b, c)


@pytest.mark.gpu
def test_gpu_fp32_matches_reference(monkeypatch):
    # TF32 off (torch's default), so the fused GEMMs run in IEEE fp32 like the reference's cuBLAS
    # calls: the two differ by summation order only, ~1e-6 relative at K <= 1040, so 1e-4 (the CPU
    # tests' tolerance) is 100x headroom.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref, fused = _pair(520, 136, num_blocks=2, seed=19)
    ref, fused = ref.cuda(), fused.cuda()
    fused.backend = "triton"
    x = _input(777, 520, device="cuda")
    gy = torch.randn(777, 136, device="cuda")
    y_ref, g_ref = _grads(ref, x, gy)
    y, g = _grads(fused, x, gy)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4 * max(b.abs().max().item(), 1.0), rtol=1e-4)


def test_saved_state_is_unpacked_by_name_and_a_misaligned_layout_is_an_error():
    saved_cls = adapter_ops._SavedForBackward
    t = [torch.full((1,), float(i)) for i in range(1 + 3 * 3 + 6 * 2 + 4)]  # 2 blocks
    st = saved_cls.from_flat(t, num_blocks=2)
    assert st.norm0 is t[0] and st.inputs == t[1:4] and st.means == t[4:7] and st.rstds == t[7:10]
    assert st.flat() == t
    blocks, head = adapter_ops._split_weights(st.weights, 2)
    assert [len(b) for b in blocks] == [6, 6] and len(head) == 4 and head[0] is t[22]
    with pytest.raises(RuntimeError, match="saved tensors for 3 blocks"):
        saved_cls.from_flat(t, num_blocks=3)
    with pytest.raises(RuntimeError, match="weight tensors for 1 blocks"):
        adapter_ops._split_weights(st.weights, 1)
