"""The contrastive losses never hold the B x B matrix: what autograd saves is O(B * D), and the
largest single allocation of forward + backward is the row-chunk workspace (C x B, C set by
``LLM2CLIP_*_LOSS_CHUNK_ELEMENTS``), measured with the profiler's per-op allocation records.
The materialising reference backend is the control: there the measurement does see B x B."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm2clip_fast.ops.clip_loss import clip_loss
from llm2clip_fast.ops.siglip_loss import siglip_loss

B, D = 301, 7
CHUNK_ROWS = 16
FP32 = 4


def _loss(name: str, backend: str):
    img = torch.randn(B, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    txt = torch.randn(B, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    if name == "clip":
        return lambda: clip_loss(img, txt, scale, backend=backend), (img, txt, scale)
    bias = torch.tensor(-5.0, requires_grad=True)
    return lambda: siglip_loss(img, txt, scale, bias, backend=backend), (img, txt, scale, bias)


@pytest.fixture()
def small_chunks(monkeypatch):
    for var in ("LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS", "LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS"):
        monkeypatch.setenv(var, str(CHUNK_ROWS * B))


def _largest_allocation(run) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run().backward()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_saved_tensors_are_o_of_b_times_d(name, backend):
    run, leaves = _loss(name, backend)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = run()
    assert saved
    assert max(t.numel() for t in saved) <= B * D, [tuple(t.shape) for t in saved]
    # The two feature matrices, a few (B,) statistics and scalars: measured 2*B*D + 3*B + 1 (CLIP).
    assert sum(t.numel() for t in saved) <= 2 * B * D + 4 * B + 4, [tuple(t.shape) for t in saved]
    torch.autograd.grad(loss, leaves)


@pytest.mark.filterwarnings("ignore:Memory block of unknown size")
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_largest_allocation_is_the_chunk_workspace(small_chunks, name, backend):
    run, _ = _loss(name, backend)
    assert _largest_allocation(run) <= CHUNK_ROWS * B * FP32


@pytest.mark.filterwarnings("ignore:Memory block of unknown size")
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_the_measurement_sees_a_materialised_matrix(small_chunks, name):
    run, _ = _loss(name, "reference")
    assert _largest_allocation(run) >= B * B * FP32
