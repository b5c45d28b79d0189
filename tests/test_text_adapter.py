"""Text adapter: architecture, state_dict interchange, input checks, torch path and fused kernels.

Fused-kernel tests run the Triton kernels under the interpreter (conftest sets TRITON_INTERPRET=1 when
there is no GPU) at small odd sizes: rows not a multiple of the block, d not a power of two.
"""

from __future__ import annotations

import pytest
import torch

from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference
from llm2clip_fast.ops import _backend
from llm2clip_fast.ops import adapter as adapter_ops


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
