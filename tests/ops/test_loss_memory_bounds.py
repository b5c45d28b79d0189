"""What the contrastive losses hold, against their memory budget (ops/_chunking.py).

- recompute path (budget below the B x B fp32 logits): what autograd saves is O(B * D), and the largest
  single allocation of forward + backward is a row-chunk workspace (C x B, C from
  ``LLM2CLIP_*_LOSS_CHUNK_ELEMENTS`` and the budget);
- keep-logits path (CLIP, budget above them): the saved bytes are the O(B * D) ones plus the kept
  fp32 logits, and neither they nor any single allocation exceed the budget.

Allocations are measured with the profiler's per-op records. The materialising reference backend is
the control: there the measurement does see B x B.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llm2clip_fast.ops._chunking import KEEP_LOGITS, RECOMPUTE, last_path
from llm2clip_fast.ops.clip_loss import clip_loss
from llm2clip_fast.ops.siglip_loss import siglip_loss

B, D = 301, 7
CHUNK_ROWS = 16
FP32 = 4
# Below the 301 x 301 fp32 logits (362 KB): the recompute path.
SMALL_BUDGET = 300_000
# Above them plus the chunk workspaces: CLIP keeps its logits.
KEEP_BUDGET = 600_000


def _loss(name: str, backend: str, budget: int):
    img = torch.randn(B, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    txt = torch.randn(B, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    if name == "clip":
        return lambda: clip_loss(img, txt, scale, backend=backend, memory_budget=budget), (img, txt, scale)
    bias = torch.tensor(-5.0, requires_grad=True)
    return (lambda: siglip_loss(img, txt, scale, bias, backend=backend, memory_budget=budget),
            (img, txt, scale, bias))


@pytest.fixture()
def small_chunks(monkeypatch):
    for var in ("LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS", "LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS"):
        monkeypatch.setenv(var, str(CHUNK_ROWS * B))


def _largest_allocation(run) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run().backward()
    return max(e.self_cpu_memory_usage for e in prof.events())


def _saved(run) -> tuple[list[torch.Tensor], torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = run()
    return saved, loss


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_recompute_path_saves_o_of_b_times_d(name, backend):
    run, leaves = _loss(name, backend, SMALL_BUDGET)
    saved, loss = _saved(run)
    if name == "clip":
        assert last_path("clip_loss") == RECOMPUTE
    assert saved
    assert max(t.numel() for t in saved) <= B * D, [tuple(t.shape) for t in saved]
    # CLIP: the two feature matrices, a few (B,) statistics, scalars and an empty logit tensor
    # (2*B*D + 3*B + 1 measured); SigLIP (one pass): d_image, d_text and two scalars.
    assert sum(t.numel() for t in saved) <= 2 * B * D + 4 * B + 4, [tuple(t.shape) for t in saved]
    torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_keep_logits_path_saves_the_logits_within_the_budget(backend):
    run, leaves = _loss("clip", backend, KEEP_BUDGET)
    saved, loss = _saved(run)
    assert last_path("clip_loss") == KEEP_LOGITS
    biggest = max(saved, key=lambda t: t.numel())
    assert biggest.shape == (B, B) and biggest.dtype == torch.float32
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes <= 2 * B * D * FP32 + 4 * B * FP32 + KEEP_BUDGET
    assert B * B * FP32 <= KEEP_BUDGET
    torch.autograd.grad(loss, leaves)


@pytest.mark.filterwarnings("ignore:Memory block of unknown size")
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_largest_allocation_is_the_chunk_workspace(small_chunks, name, backend):
    run, _ = _loss(name, backend, SMALL_BUDGET)
    assert _largest_allocation(run) <= CHUNK_ROWS * B * FP32


@pytest.mark.filterwarnings("ignore:Memory block of unknown size")
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_keep_logits_largest_allocation_within_the_budget(small_chunks, backend):
    run, _ = _loss("clip", backend, KEEP_BUDGET)
    largest = _largest_allocation(run)
    assert last_path("clip_loss") == KEEP_LOGITS
    assert B * B * FP32 <= largest <= KEEP_BUDGET


@pytest.mark.filterwarnings("ignore:Memory block of unknown size")
def test_the_budget_caps_the_chunks_too(monkeypatch):
    # Without a chunk setting the CPU workspace would be 8M elements; a 40 KB budget cuts it to
    # 40_000 // (B * 8) = 16 rows (the C++ backend counts 8 bytes per workspace element).
    for var in ("LLM2CLIP_CLIP_LOSS_CHUNK_ELEMENTS", "LLM2CLIP_SIGLIP_LOSS_CHUNK_ELEMENTS"):
        monkeypatch.delenv(var, raising=False)
    run, _ = _loss("clip", "cpu", 40_000)
    assert _largest_allocation(run) <= 40_000


@pytest.mark.filterwarnings("ignore:Memory block of unknown size")
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_the_measurement_sees_a_materialised_matrix(small_chunks, name):
    run, _ = _loss(name, "reference", SMALL_BUDGET)
    assert _largest_allocation(run) >= B * B * FP32


def test_budget_from_argument_environment_and_default(monkeypatch):
    from llm2clip_fast.ops import _chunking

    monkeypatch.delenv(_chunking.BUDGET_ENV, raising=False)
    monkeypatch.setattr(_chunking, "free_memory_bytes", lambda device: 8 << 30)
    cpu = torch.device("cpu")
    assert _chunking.memory_budget(cpu) == 2 << 30  # a quarter of what is free
    monkeypatch.setenv(_chunking.BUDGET_ENV, "512MiB")
    assert _chunking.memory_budget(cpu) == 512 << 20
    assert _chunking.memory_budget(cpu, "1.5GB") == 1_500_000_000  # the argument wins
    assert _chunking.memory_budget(cpu, 1000) == 1000
    for bad in ("lots", "-1", "12 parsecs"):
        monkeypatch.setenv(_chunking.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match="LLM2CLIP_LOSS_MEMORY_BUDGET must be a byte count"):
            _chunking.memory_budget(cpu)
    monkeypatch.delenv(_chunking.BUDGET_ENV)
    with pytest.raises(ValueError, match="memory_budget must be >= 0 bytes"):
        clip_loss(torch.ones(2, 3), torch.ones(2, 3), 1.0, memory_budget=-5)
    with pytest.raises(TypeError, match="memory_budget must be a number of bytes"):
        clip_loss(torch.ones(2, 3), torch.ones(2, 3), 1.0, memory_budget=2.5)


def test_info_reports_the_budget_and_the_path_a_training_call_takes(monkeypatch):
    from llm2clip_fast import info

    monkeypatch.setenv("LLM2CLIP_LOSS_MEMORY_BUDGET", "256MiB")
    (cpu,) = [r for r in info.collect()["loss_memory"] if r["device"] == "cpu"]
    assert cpu["budget_bytes"] == 256 << 20 and "LLM2CLIP_LOSS_MEMORY_BUDGET=256MiB" in cpu["source"]
    paths = {b: p["keep_logits"] for b, p in cpu["clip_paths"].items()}
    assert paths == {"4096": True, "16384": False, "65536": False}  # 64 MiB of logits fit; 1 GiB do not
    assert "B=16384  float32: recompute" in info.render(info.collect())
