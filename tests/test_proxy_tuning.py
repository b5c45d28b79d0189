"""Loss launchers tune on a TUNE_ROWS-row proxy before a large first launch (llm2clip_kernels/_proxy_tuning).

Under the interpreter each kernel has one config, so these tests check the plumbing that matters on a
GPU: the proxy runs once per (kernel, D, dtype, device), on sliced operands whose autotune key equals
the full launch's, and the full launch's results are unchanged by it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llm2clip_fast.kernels import _proxy_tuning
from llm2clip_fast.kernels import clip_loss as clip_kernels
from llm2clip_fast.kernels import siglip_loss as siglip_kernels

from llm2clip_fast.ops.clip_loss import clip_loss
from llm2clip_fast.ops.reference import clip_loss_reference, siglip_loss_reference
from llm2clip_fast.ops.siglip_loss import siglip_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_tune_rows(monkeypatch):
    monkeypatch.setattr(_proxy_tuning, "TUNE_ROWS", 32)
    _proxy_tuning.forget_tuning()
    yield 32
    _proxy_tuning.forget_tuning()


def _spy(monkeypatch, module, name):
    calls: list[tuple[int, ...]] = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape[:1]) + tuple(args[1].shape[:1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _features(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE).requires_grad_()
    return img, txt


def test_capped_bucket(small_tune_rows):
    assert [_proxy_tuning.capped_bucket(n) for n in (1, 2, 3, 17, 32, 33, 10**6)] == [1, 2, 4, 32, 32, 32, 32]


def test_clip_tunes_once_on_proxy_and_matches_reference(monkeypatch, small_tune_rows):
    fwd = _spy(monkeypatch, clip_kernels, "clip_lse_forward_triton")
    bwd = _spy(monkeypatch, clip_kernels, "clip_grad_chunk_triton")
    img, txt = _features(70, 8, seed=0)
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    for step in range(2):
        loss = clip_loss(img, txt, scale, backend="triton")
        g = torch.autograd.grad(loss, (img, txt, scale))
        i2, t2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
        s2 = scale.detach().clone().requires_grad_()
        ref = clip_loss_reference(i2, t2, s2)
        g_ref = torch.autograd.grad(ref, (i2, t2, s2))
        torch.testing.assert_close(loss.float(), ref, atol=2e-5, rtol=2e-5)
        for got, want in zip(g, g_ref):
            torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=2e-5)
        if step == 0:
            # outer call, then the proxy on the first 32 rows of each operand
            assert fwd == [(70, 70), (32, 32)]
            assert bwd[:2] == [(70, 70), (32, 32)]
    # the second step launched the full problem only
    assert fwd[2:] == [(70, 70)]
    assert (32, 32) not in bwd[2:]


def test_small_problems_never_run_a_proxy(monkeypatch, small_tune_rows):
    fwd = _spy(monkeypatch, clip_kernels, "clip_lse_forward_triton")
    img, txt = _features(20, 8, seed=1)
    clip_loss(img, txt, torch.tensor(10.0, device=DEVICE), backend="triton").backward()
    assert fwd == [(20, 20)]


def test_siglip_proxy_keeps_the_first_chunks_rows(monkeypatch, small_tune_rows):
    fwd = _spy(monkeypatch, siglip_kernels, "siglip_forward_rows")
    bwd = _spy(monkeypatch, siglip_kernels, "siglip_backward")
    img, txt = _features(70, 8, seed=2)
    scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    loss = siglip_loss(img, txt, scale, bias, backend="triton")
    g = torch.autograd.grad(loss, (img, txt, scale, bias))
    i2, t2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    s2, b2 = scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ref = siglip_loss_reference(i2, t2, s2, b2)
    g_ref = torch.autograd.grad(ref, (i2, t2, s2, b2))
    torch.testing.assert_close(loss.float(), ref, atol=2e-5, rtol=2e-5)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=2e-5)
    assert fwd == [(70, 70), (32, 32)]
    assert bwd == [(70, 70), (32, 32)]
