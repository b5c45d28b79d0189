"""8-bit linear of the frozen LLM: every backend of ``w8a8_linear`` against the torch reference, the
quantisation primitives against each other (exact codes), and ``W8A8Linear`` against ``nn.Linear``.

Odd shapes (37 rows, K=40, N=24); the Triton kernels run under the interpreter (int8; fp8 needs a GPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm2clip_fast.models.w8a8 import W8A8Linear
from llm2clip_fast.ops import _backend
from llm2clip_fast.ops import w8a8_linear as ops

INT8, FP8 = torch.int8, torch.float8_e4m3fn
HAS_CPU = ops._cpu_problem() is None
needs_cpu = pytest.mark.skipif(not HAS_CPU,
                               reason="llm2clip_fast._C built without the int8 row kernels, or no oneDNN")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(code_dtype, x_dtype=torch.float32, bias=True, smooth=True, m=37, k=40, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(x_dtype)
    x[3] = 0.0  # a row of zeros keeps scale 1 and codes 0
    x[:, 5] *= 30.0  # an outlier channel
    w = torch.randn(n, k, generator=g) / k**0.5
    inv = (torch.rand(k, generator=g) + 0.5) if smooth else None
    # The weight is quantised smoothed, w * s with s = 1 / inv: (x * inv) @ (w * s)^T = x @ w^T.
    weight_q, weight_scale = ops.quantize_weight(w if inv is None else w / inv[None, :], code_dtype)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, weight_q, weight_scale, b, inv


def _ref(x, w, b):
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smooth", [True, False])
def test_quantize_weight_and_rows_round_trip(bias, smooth):
    for code, tol in ((INT8, 0.02), (FP8, 0.08)):
        x, w, wq, ws, _, inv = _operands(code, bias=bias, smooth=smooth)
        assert wq.dtype == code and ws.dtype == torch.float32
        deq = wq.float() * ws[:, None]
        target = w if inv is None else w / inv[None, :]
        assert ((deq - target).norm() / target.norm()) < tol
        codes, scale = ops.quantize_rows_torch(x, inv, code)
        assert scale[3] == 1.0 and (codes[3].float() == 0).all()
        xs = x if inv is None else x * inv
        back = codes.float() * scale[:, None]
        assert ((back - xs).norm() / xs.norm()) < tol


@needs_cpu
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [True, False])
def test_cpp_row_quantisation_gives_the_torch_codes(x_dtype, smooth):
    x, *_, inv = _operands(INT8, x_dtype=x_dtype, smooth=smooth)
    codes, scale = torch.ops.llm2clip_fast.int8_quantize_rows_cpu(x, inv)
    want_codes, want_scale = ops.quantize_rows_torch(x, inv, INT8)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    # Same codes up to a tie rounded the other way (x * inv * 127 / amax: one rounding apart).
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    assert (codes != want_codes).float().mean() < 0.01


def test_triton_row_quantisation_gives_the_torch_codes():
    from llm2clip_fast.kernels import quantize as K

    x, *_, inv = _operands(INT8)
    x, inv = x.to(DEVICE), inv.to(DEVICE)
    codes, scale = K.quantize_rows(x, inv, INT8)
    want_codes, want_scale = ops.quantize_rows_torch(x, inv, INT8)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    acc = torch.randint(-1000, 1000, (37, 24), dtype=torch.int32, device=DEVICE)
    cs, b = torch.rand(24, device=DEVICE), torch.randn(24, device=DEVICE)
    got = K.dequantize_int32(acc, scale, cs, b, torch.float32)
    torch.testing.assert_close(got, acc.float() * scale[:, None] * cs[None, :] + b)


def _backends():
    return [pytest.param("cpu", marks=needs_cpu), "triton", "torch"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_backends_agree_with_the_reference(backend, x_dtype, bias):
    x, w, wq, ws, b, inv = _operands(INT8, x_dtype=x_dtype, bias=bias)
    dev = DEVICE if backend == "triton" else "cpu"
    args = [t.to(dev) if t is not None else None for t in (x, wq, ws, b, inv)]
    y = ops.w8a8_linear(*args, backend=backend)
    assert y.dtype == x_dtype and y.shape == (37, 24)
    assert _backend.last_selected("w8a8_linear") == backend
    want = _ref(x.float(), w, b).to(y.device)
    err = ((y.double() - want).norm() / want.norm()).item()
    assert err < 0.02, err
    # Every backend computes the same codes and scales: they agree far closer than with the float GEMM.
    ref = ops.w8a8_linear(x, wq, ws, b, inv, backend="torch")
    tol = 1e-2 if x_dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.cpu().float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


def test_fp8_reference_backend_and_cpu_refusal():
    x, w, wq, ws, b, inv = _operands(FP8)
    y = ops.w8a8_linear(x, wq, ws, b, inv)
    assert _backend.last_selected("w8a8_linear") == "torch"
    want = _ref(x, w, b)
    assert ((y.double() - want).norm() / want.norm()) < 0.06
    op = _backend.registered_ops()["w8a8_linear"]
    ctx = _backend.DispatchContext((x, wq, ws), forced=True)
    assert any("int8" in r for r in op.get("cpu").not_supported_reasons(ctx))


def test_bad_operands_raise_clear_errors():
    x, _, wq, ws, b, _ = _operands(INT8)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        ops.w8a8_linear(x.long(), wq, ws, b)
    with pytest.raises(ValueError, match="weight_q must be int8 or float8_e4m3fn"):
        ops.w8a8_linear(x, wq.float(), ws, b)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        ops.w8a8_linear(x, wq, ws[:3], b)
    with pytest.raises(ValueError, match="code_dtype must be"):
        ops.quantize_weight(torch.randn(3, 4), torch.float16)


@pytest.mark.parametrize("mode", ["w8a8-int8", "w8a8-fp8"])
def test_w8a8_linear_module_matches_nn_linear(mode):
    torch.manual_seed(1)
    lin = nn.Linear(40, 24)
    x = torch.randn(2, 19, 40)
    x[..., 7] *= 40.0
    smooth = (x.abs().amax(dim=(0, 1)) ** 0.5) / (lin.weight.abs().amax(dim=0) ** 0.5)
    q = W8A8Linear(lin, mode, smooth)
    assert q.weight_q.dtype == (torch.int8 if mode.endswith("int8") else torch.float8_e4m3fn)
    with torch.no_grad():
        want = lin(x)
        got = q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert ((got - want).norm() / want.norm()) < (0.02 if mode.endswith("int8") else 0.06)
    assert "smoothed=True" in repr(q)
    with pytest.raises(ValueError, match="mode must be one of"):
        W8A8Linear(lin, "int4")
    with pytest.raises(ValueError, match=r"smooth must have shape \(40,\)"):
        W8A8Linear(lin, mode, torch.ones(3))


@needs_cpu
def test_module_keeps_the_packed_weight_until_moved():
    q = W8A8Linear(nn.Linear(40, 24), "w8a8-int8")
    q(torch.randn(5, 40))
    packed = q._packed
    assert packed is not None
    q(torch.randn(5, 40))
    assert q._packed is packed
    q.to(torch.float32)
    assert q._packed is None


@pytest.mark.gpu
@pytest.mark.parametrize("code", [INT8, FP8])
@pytest.mark.parametrize("m", [37, 5])  # 5 rows: torch._int_mm needs more than 16, the op pads
def test_gpu_triton_backend_agrees_with_the_reference(code, m):
    x, w, wq, ws, b, inv = _operands(code, x_dtype=torch.bfloat16, m=m, k=48, n=32)
    args = [t.cuda() for t in (x, wq, ws, b, inv)]
    y = ops.w8a8_linear(*args)
    assert _backend.last_selected("w8a8_linear") == "triton" and y.dtype == torch.bfloat16
    ref = ops.w8a8_linear(*args, backend="torch")
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    want = _ref(x.float(), w, b).cuda()
    assert ((y.double() - want).norm() / want.norm()) < (0.02 if code == INT8 else 0.06)
