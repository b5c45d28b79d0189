"""Fused masked mean pooling: every backend against the plain-torch reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from llm2clip_fast.ops import _backend
from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool
from llm2clip_fast.ops.reference import masked_mean_pool_reference

# (B, L, H): odd sizes, not multiples of any block; one row gets an empty mask below.
SHAPES = [(3, 7, 37), (2, 19, 300)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, H = shape
    hidden = torch.randn(B, L, H, generator=g).to(dtype)
    mask = torch.rand(B, L, generator=g) > 0.35
    mask[0, 0] = True
    mask[-1] = False  # an empty row pools to zeros
    return hidden, mask


def _tolerance(hidden, mask, normalize):
    """Low-precision rule: at most twice the error of plain torch computing in the input dtype."""
    exact = masked_mean_pool_reference(hidden.double(), mask, normalize=normalize)
    if hidden.dtype == torch.float32:
        return 1e-5
    m = mask.to(hidden.dtype).unsqueeze(-1)
    low = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    if normalize:
        low = torch.nn.functional.normalize(low, dim=-1)
    rows = mask.any(dim=1)  # in fp16 F.normalize's eps underflows: an empty row would give 0/0
    return 2 * (low[rows].double() - exact[rows]).abs().max().item() + 1e-6


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_forward_matches_reference(backend, dtype, shape, normalize):
    hidden, mask = _inputs(shape, dtype)
    out = masked_mean_pool(hidden, mask, normalize=normalize, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    exact = masked_mean_pool_reference(hidden.double(), mask, normalize=normalize)
    assert (out.double() - exact).abs().max().item() <= _tolerance(hidden, mask, normalize)
    assert torch.all(out[-1] == 0)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@pytest.mark.parametrize("normalize", [False, True])
def test_backward_matches_autograd_of_reference(backend, normalize):
    hidden, mask = _inputs((3, 9, 45), torch.float32, seed=1)
    hidden.requires_grad_(True)
    weight = torch.randn(3, 45, generator=torch.Generator().manual_seed(2))
    out = masked_mean_pool(hidden, mask.to(torch.int64), normalize=normalize, backend=backend)
    (grad,) = torch.autograd.grad((out * weight).sum(), hidden)
    ref = masked_mean_pool_reference(hidden, mask, normalize=normalize)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), hidden)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)


def test_backward_low_precision_keeps_input_dtype():
    hidden, mask = _inputs((2, 5, 16), torch.bfloat16)
    hidden.requires_grad_(True)
    out = masked_mean_pool(hidden, mask, normalize=True, backend="cpu")
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    assert grad.dtype == torch.bfloat16
    ref = masked_mean_pool_reference(hidden.float(), mask, normalize=True)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2, rtol=1e-2)


def test_strided_hidden_and_integer_mask():
    hidden = torch.randn(4, 11, 24)[:, ::2]  # sequence stride 48: not contiguous
    mask = (torch.arange(6) < torch.tensor([[1], [6], [3], [0]])).to(torch.int32)
    for backend in ("cpu", "triton", "torch"):
        out = masked_mean_pool(hidden, mask, backend=backend)
        torch.testing.assert_close(out, masked_mean_pool_reference(hidden, mask), atol=1e-6, rtol=1e-5)


def test_automatic_dispatch_on_cpu_picks_the_extension():
    hidden, mask = _inputs((2, 3, 8), torch.float32)
    assert _backend.select_backend("masked_mean_pool", [hidden, mask.to(torch.uint8)]).name == "cpu"


def test_cpu_op_passes_opcheck():
    hidden, mask = _inputs((2, 5, 9), torch.bfloat16)
    torch.library.opcheck(
        torch.ops.llm2clip_fast.masked_mean_pool_forward, (hidden, mask, True, 1e-12),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_bad_inputs_raise_clear_errors():
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        masked_mean_pool(hidden[0], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_mean_pool(hidden, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool or integer"):
        masked_mean_pool(hidden, torch.ones(2, 3))
    with pytest.raises(TypeError, match="hidden_states must be float32"):
        masked_mean_pool(hidden.double(), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(_backend.BackendUnavailableError, match="cuda"):
        masked_mean_pool(hidden, torch.ones(2, 3, dtype=torch.bool), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backends_match_reference(backend, dtype):
    hidden, mask = _inputs((5, 77, 1031), dtype)
    hidden, mask = hidden.cuda(), mask.cuda()
    for normalize in (False, True):
        out = masked_mean_pool(hidden, mask, normalize=normalize, backend=backend)
        exact = masked_mean_pool_reference(hidden.double(), mask, normalize=normalize)
        assert (out.double() - exact).abs().max().item() <= _tolerance(hidden.cpu(), mask.cpu(), normalize)
