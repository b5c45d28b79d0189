"""Fused SigLIP loss: every backend and both paths (one-pass for 'mean'/'sum' with gradients, two-pass
otherwise) against the float64 reference, the overlapped chunk schedule, primitives, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _deferred_side import DeferredSide, ForgetfulSide, use_side

from llm2clip_fast.ops import siglip_loss as siglip_ops
from llm2clip_fast.ops._backend import BackendUnavailableError
from llm2clip_fast.ops._chunking import last_path
from llm2clip_fast.ops.reference import siglip_loss_reference
from llm2clip_fast.ops.siglip_loss import (
    ONE_PASS,
    TWO_PASS,
    siglip_backward,
    siglip_forward_backward,
    siglip_forward_rows,
    siglip_loss,
)

HAS_CPU_OPS = hasattr(torch.ops.llm2clip_fast, "siglip_loss_forward")
needs_cpu_ops = pytest.mark.skipif(not HAS_CPU_OPS, reason="llm2clip_fast._C built without siglip_loss ops")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _features(m: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0, n: int | None = None):
    g = torch.Generator().manual_seed(seed)
    n = m if n is None else n
    img = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt[: min(m, n)] = 0.7 * txt[: min(m, n)] + img[: min(m, n)]  # positives correlate, as after training
    txt = F.normalize(txt, dim=-1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


def _loss_and_grads(fn, img, txt, scale, bias, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, upstream)
    return (loss.detach().double(), *(g.double() for g in grads))


def _errors(got, want):
    return [(a - b).abs().max().item() for a, b in zip(got, want)]


def _lowp_torch_loss(img, txt, scale, bias, reduction="mean"):
    """OpenCLIP's materialised SigLIP loss computed in the features' own (low) precision."""
    logits = scale.to(img.dtype) * img @ txt.t() + bias.to(img.dtype)
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=img.dtype) - 1
    rows = -F.logsigmoid(labels * logits).sum(dim=1)
    return rows.sum() / img.shape[0] if reduction == "mean" else rows.sum() if reduction == "sum" else rows


def _check_against_reference(backend, b, d, dtype, reduction="mean", scale_value=10.0, bias_value=-5.0,
                             device="cpu"):
    img, txt = _features(b, d, dtype, device)
    scale = torch.tensor(scale_value, device=device, dtype=torch.float32)
    bias = torch.tensor(bias_value, device=device, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand((b,) if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    upstream = upstream.to(device)
    got = _loss_and_grads(lambda i, t, s, c: siglip_loss(i, t, s, c, reduction=reduction, backend=backend),
                          img, txt, scale, bias, upstream.float())
    assert last_path("siglip_loss") == (TWO_PASS if reduction == "none" else ONE_PASS)

    def reference(i, t, s, c):
        return siglip_loss_reference(i.double(), t.double(), s.double(), c.double(), reduction=reduction)

    want = _loss_and_grads(reference, img, txt, scale, bias, upstream.double())
    err = _errors(got, want)
    names = ("loss", "d_image", "d_text", "d_scale", "d_bias")
    if dtype in (torch.float32, torch.float64):
        tol = 1e-4 if device == "cuda" else 2e-5
        for name, e, w in zip(names, err, want):
            assert e <= tol * max(1.0, w.abs().max().item()), (backend, b, d, dtype, name, e)
    else:
        # Tolerance rule: at most twice the error of the same loss computed plainly in that dtype.
        lowp = _loss_and_grads(lambda i, t, s, c: _lowp_torch_loss(i, t, s, c, reduction), img, txt,
                               scale.to(dtype), bias.to(dtype), upstream.to(dtype))
        lowp_err = _errors(lowp, want)
        for name, e, le, w in zip(names, err, lowp_err, want):
            assert e <= 2 * le + 1e-6 * max(1.0, w.abs().max().item()), (backend, b, d, dtype, name, e, le)
    return got


def _check_primitives(backend, m, n, d, offset, device="cpu", dtype=torch.float32):
    img, txt = _features(m, d, dtype, device, seed=3, n=n)
    s, b = torch.tensor(7.0, device=device), torch.tensor(-3.0, device=device)
    weight = torch.rand(m, generator=torch.Generator().manual_seed(4)).to(device)
    got_rows = siglip_forward_rows(img, txt, s, b, offset=offset, backend=backend)
    want_rows = siglip_forward_rows(img.double(), txt.double(), s.double(), b.double(), offset=offset,
                                    backend="reference")
    torch.testing.assert_close(got_rows.double(), want_rows, atol=1e-4, rtol=1e-5)
    got = siglip_backward(img, txt, s, b, weight, offset=offset, backend=backend)
    want = siglip_backward(img.double(), txt.double(), s.double(), b.double(), weight.double(), offset=offset,
                           backend="reference")
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=1e-4, rtol=1e-4)
    # One pass: the rows and the gradients of their plain sum.
    got = siglip_forward_backward(img, txt, s, b, offset=offset, backend=backend)
    want = (want_rows, *siglip_backward(img.double(), txt.double(), s.double(), b.double(),
                                        torch.ones((), dtype=torch.float64, device=device), offset=offset,
                                        backend="reference"))
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=1e-4, rtol=1e-4)


# ---- triton (interpreter on CPU, real kernels where CUDA exists) ------------------------------

# Odd sizes: B = 1, B not a multiple of the 16 x 32 interpreter tiles or of the chunk, D = 1, D not a
# multiple of 16; every dtype and reduction.
TRITON_CASES = [(1, 3, torch.float32, "mean"), (1, 1, torch.bfloat16, "none"), (7, 64, torch.float16, "sum"),
                (45, 40, torch.float32, "none"), (33, 5, torch.float16, "mean"),
                (37, 20, torch.bfloat16, "sum"), (70, 1, torch.bfloat16, "mean"),
                (70, 1, torch.float32, "none"), (37, 17, torch.float16, "none")]


@pytest.mark.parametrize(("b", "d", "dtype", "reduction"), TRITON_CASES)
def test_triton_matches_reference(b, d, dtype, reduction):
    _check_against_reference("triton", b, d, dtype, reduction=reduction, device=DEVICE)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_triton_over_several_row_chunks(monkeypatch, reduction):
    # 70 rows and a workspace of 32 * 70 elements -> chunks of 32, 32, 6 rows.
    monkeypatch.setenv("LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS", str(32 * 70))
    _check_against_reference("triton", 70, 7, torch.float32, reduction=reduction, device=DEVICE)


def test_no_grad_forward_takes_the_loss_pass_only():
    img, txt = _features(23, 9, torch.float32)
    with torch.no_grad():
        got = siglip_loss(img, txt, 6.0, -2.0, backend="triton")
    assert last_path("siglip_loss") == TWO_PASS
    want = siglip_loss_reference(img.double(), txt.double(), 6.0, -2.0).double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_overlapped_schedule_matches_reference_with_late_epilogues(monkeypatch, backend, reduction):
    # The CUDA side stream replaced by one that runs each epilogue only when waited for (see
    # tests/_deferred_side.py). 61 rows in chunks of 8.
    monkeypatch.setenv("LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS", str(8 * 61))
    sides = use_side(monkeypatch, DeferredSide)
    _check_against_reference(backend, 61, 9, torch.float32, reduction=reduction)
    assert len(sides) == (2 if reduction == "none" else 1)
    assert all(side.done == len(side.queue) == 8 for side in sides)


def test_the_deferred_side_catches_a_schedule_without_waits(monkeypatch):
    monkeypatch.setenv("LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS", str(8 * 61))
    use_side(monkeypatch, ForgetfulSide)
    with pytest.raises(AssertionError):
        _check_against_reference("torch", 61, 9, torch.float32, reduction="sum")


@pytest.mark.parametrize("offset", [0, 19, -5])
def test_triton_primitives_rectangular_with_offset(offset):
    _check_primitives("triton", 23, 50, 20, offset, device=DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("b", "d"), [(1000, 256), (4099, 1024)])
def test_triton_gpu_low_precision(b, d, dtype):
    _check_against_reference("triton", b, d, dtype, scale_value=20.0, bias_value=-10.0, device="cuda")


@pytest.mark.gpu
def test_triton_gpu_large_d_and_offsets():
    _check_primitives("triton", 700, 2100, 4096, 300, device="cuda")


# ---- C++ backend --------------------------------------------------------------------------------


@needs_cpu_ops
@pytest.mark.parametrize(("b", "d", "reduction"), [(1, 3, "mean"), (65, 96, "sum"), (130, 64, "none"),
                                                   (301, 33, "mean")])
def test_cpu_matches_reference_fp32(b, d, reduction):
    _check_against_reference("cpu", b, d, torch.float32, reduction=reduction)


@needs_cpu_ops
@pytest.mark.parametrize("native_bf16_gemm", [False, True])
def test_cpu_matches_reference_bf16(monkeypatch, native_bf16_gemm):
    # Both paths: bf16 GEMMs (where the CPU has bf16 units) and the fp32 upcast elsewhere.
    monkeypatch.setattr(siglip_ops, "cpu_has_fast_bf16", lambda: native_bf16_gemm)
    monkeypatch.setenv("LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS", str(40 * 97))
    _check_against_reference("cpu", 97, 48, torch.bfloat16, scale_value=20.0)


@needs_cpu_ops
def test_cpu_matches_reference_fp16():
    _check_against_reference("cpu", 51, 24, torch.float16, reduction="none")


@needs_cpu_ops
def test_cpu_several_chunks(monkeypatch):
    monkeypatch.setenv("LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS", str(30 * 101))
    _check_against_reference("cpu", 101, 17, torch.float32, reduction="none")


@needs_cpu_ops
@pytest.mark.parametrize("offset", [0, 40, -7])
def test_cpu_primitives_rectangular_with_offset(offset):
    _check_primitives("cpu", 37, 90, 20, offset)


@needs_cpu_ops
def test_cpu_far_negatives_keep_their_tiny_terms():
    # A trained model puts most pairs deep in the negative tail (z ~ -30): each term is ~1e-13,
    # below float32's epsilon next to 1, and a naive log(1 + exp(z)) would drop them all.
    img, txt = _features(64, 32, torch.float32, seed=5)
    s, b = torch.tensor(10.0), torch.tensor(-30.0)
    got = siglip_forward_rows(img, txt, s, b, backend="cpu").double()
    want = siglip_forward_rows(img.double(), txt.double(), s.double(), b.double(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@needs_cpu_ops
def test_cpu_ops_pass_opcheck():
    img, txt = _features(9, 8, torch.float32)
    s, b = torch.tensor(3.0), torch.tensor(-1.0)
    torch.library.opcheck(torch.ops.llm2clip_fast.siglip_loss_forward.default, (img, txt, s, b, 2, 4))
    torch.library.opcheck(torch.ops.llm2clip_fast.siglip_loss_backward.default,
                          (img, txt, s, b, torch.rand(9), 2, 4))
    torch.library.opcheck(torch.ops.llm2clip_fast.siglip_loss_fused.default, (img, txt, s, b, -1, 4))


# ---- torch backends and gradcheck ----------------------------------------------------------------


@pytest.mark.parametrize(("b", "d", "dtype", "reduction"), [
    (1, 19, torch.float32, "mean"), (37, 19, torch.float32, "none"), (29, 1, torch.bfloat16, "sum"),
    (31, 20, torch.float16, "none"), (17, 6, torch.float64, "mean")])
def test_torch_backend_matches_reference(b, d, dtype, reduction):
    _check_against_reference("torch", b, d, dtype, reduction=reduction)


def test_torch_primitives_with_offset(monkeypatch):
    monkeypatch.setenv("LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS", str(10 * 40))
    _check_primitives("torch", 25, 40, 9, 11)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_ops), "torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    img, txt = _features(6, 5, torch.float64, seed=7)
    leaves = [img.requires_grad_(), txt.requires_grad_(),
              torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
              torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda i, t, s, c: siglip_loss(i, t, s, c, reduction=reduction, backend=backend), leaves
    )


def test_automatic_dispatch_and_float_parameters():
    img, txt = _features(12, 8, torch.float32)
    got = siglip_loss(img, txt, 10.0, -5.0)
    want = siglip_loss_reference(img.double(), txt.double(), 10.0, -5.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs():
    img, txt = _features(20, 16, torch.float32)
    img_nc = img.t().contiguous().t()
    txt_nc = torch.stack([txt, torch.zeros_like(txt)], dim=2).flatten(1)[:, ::2]
    assert not img_nc.is_contiguous() and not txt_nc.is_contiguous()
    got = siglip_loss(img_nc, txt_nc, 5.0, -1.0, backend="torch")
    torch.testing.assert_close(got, siglip_loss_reference(img, txt, 5.0, -1.0))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (lambda i, t: (i, t[:5], 1.0, 0.0), ValueError, "same batch size"),
        (lambda i, t: (i, t[:, :3], 1.0, 0.0), ValueError, "same feature dimension"),
        (lambda i, t: (i[0], t, 1.0, 0.0), ValueError, "2-D"),
        (lambda i, t: (i[:0], t[:0], 1.0, 0.0), ValueError, "non-empty"),
        (lambda i, t: (i.long(), t, 1.0, 0.0), TypeError, "floating dtype"),
        (lambda i, t: (i, t, 0.0, 0.0), ValueError, "positive"),
        (lambda i, t: (i, t, torch.ones(2), 0.0), ValueError, "scalar"),
        (lambda i, t: (i, t, 1.0, float("nan")), ValueError, "logit_bias must be finite"),
        (lambda i, t: (i, t, 1.0, torch.zeros(3)), ValueError, "logit_bias must be a scalar"),
        (lambda i, t: (i, t, 1.0, torch.tensor(1)), TypeError, "logit_bias must have a floating dtype"),
        (lambda i, t: (i, t, 1.0, "0"), TypeError, "logit_bias must be a float"),
        (lambda i, t: ("img", t, 1.0, 0.0), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, exc, match):
    img, txt = _features(8, 6, torch.float32)
    with pytest.raises(exc, match=match):
        siglip_loss(*args(img, txt))


def test_bad_reduction_offset_weight_and_forced_backend():
    img, txt = _features(8, 6, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        siglip_loss(img, txt, 1.0, 0.0, reduction="avg")
    with pytest.raises(TypeError, match="offset"):
        siglip_forward_rows(img, txt, 1.0, 0.0, offset=1.5)
    with pytest.raises(ValueError, match="row_weight"):
        siglip_backward(img, txt, 1.0, 0.0, torch.ones(3))
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        siglip_loss(img, txt, 1.0, 0.0, backend="nope")
    with pytest.raises(BackendUnavailableError, match="float64"):
        siglip_loss(img.double(), txt.double(), 1.0, 0.0, backend="triton")


# ---- Triton autotuning: whichever warp count wins, the write-only epilogue gives the same result ----


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the interpreter's autotuner")
@pytest.mark.parametrize("winner", [0, 1])
def test_triton_epilogue_right_whichever_warp_config_autotune_picks(monkeypatch, winner):
    import triton
    from _autotune_probe import autotuner_with_winner
    from llm2clip_fast.kernels import siglip_loss as kernels

    configs = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]
    tuned = autotuner_with_winner(kernels._siglip_tile_kernel, configs, winner=winner)
    monkeypatch.setattr(kernels, "_siglip_tile_kernel", tuned)
    _check_primitives("triton", 41, 35, 12, 3)  # three keys (loss, gradient, both): each tuned
    assert len(tuned.configs_timings) == 2
    assert kernels.chosen_configs()["siglip_tile"].startswith("BLOCK_M=")


# ---- Triton: large logits (scale 100, bias -10) ------------------------------------------------------


def _separated_features(m: int, d: int):
    """Positives at cosine ~1 (z ~ +90), a few negatives duplicating another row's image (z ~ +90 as
    a negative: loss ~90, gradient ~1) and anti-correlated negatives (z ~ -110)."""
    g = torch.Generator().manual_seed(11)
    img = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.01 * torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    txt[m - 1] = img[0]
    txt[m - 2] = -img[1]
    return img.float(), txt.float()


@pytest.mark.filterwarnings("error:overflow encountered in exp:RuntimeWarning")
def test_triton_large_logits_finite_and_exact():
    # The epilogue's sigmoid and softplus share exp(-|z|) <= 1: no exp(110) overflows on the way.
    m, d = 37, 24
    img, txt = _separated_features(m, d)
    scale, bias = torch.tensor(100.0), torch.tensor(-10.0)
    z = 100.0 * img.double() @ txt.double().t() - 10.0
    assert z.max() > 85 and z.min() < -105  # the regime under test
    rows = siglip_forward_rows(img, txt, scale, bias, backend="triton")
    want_rows = siglip_forward_rows(img.double(), txt.double(), scale.double(), bias.double(),
                                    backend="reference")
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=1e-5)
    weight = torch.rand(m, generator=torch.Generator().manual_seed(12)) + 0.5
    got = siglip_backward(img, txt, scale, bias, weight, backend="triton")
    want = siglip_backward(img.double(), txt.double(), scale.double(), bias.double(), weight.double(),
                           backend="reference")
    for name, a, w in zip(("d_image", "d_text", "d_scale", "d_bias"), got, want):
        assert torch.isfinite(a).all(), name
        a = a.double().reshape(w.shape[0] if w.dim() else 1, -1)
        w = w.reshape(a.shape)
        # Row by row relative to the row's own size: rows made only of well-separated pairs are tiny.
        err = (a - w).norm(dim=1)
        assert (err <= 1e-5 * w.norm(dim=1) + 1e-30).all(), (name, err.max().item())
