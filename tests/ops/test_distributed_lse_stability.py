"""The global CLIP loss at logit scale 100 in fp32, with every backend forced, across two gloo ranks.

At scale 100 column log-sum-exps reach ~100 and ``exp(100)`` overflows fp32, so the cross-rank
combination of the column partials must shift by their maximum before exponentiating. Every backend
must give OpenCLIP's per-rank losses and gradients (computed in float64 on the concatenated batch).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _ranks import run_on_ranks

SIZES = [3, 4]
DIM = 8
SCALE = 100.0
BACKENDS = [None, "torch", "cpu", "triton", "reference"]  # None: automatic dispatch


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Three clusters of near-duplicates: similarities near 1 put column LSEs near 100 (past fp32's exp
    # range) while the loss stays of order one, because each image has close rivals to its text.
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    centres = torch.randn(3, DIM, generator=g, dtype=torch.float64)[torch.arange(n) % 3]
    img = F.normalize(centres + 0.06 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.06 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _rank_losses(rank: int) -> dict:
    from llm2clip_fast.ops.clip_loss import clip_loss

    img, txt = _global_batch()
    lo = sum(SIZES[:rank])
    img, txt = img[lo:lo + SIZES[rank]].float(), txt[lo:lo + SIZES[rank]].float()
    out = {}
    for backend in BACKENDS:
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(),
                  torch.tensor(SCALE, requires_grad=True)]
        loss = clip_loss(*leaves, distributed=True, backend=backend)
        out[backend] = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    return out


def _expected() -> list[list[torch.Tensor]]:
    """OpenCLIP ClipLoss(local_loss=True, gather_with_grad=True) per rank, float64, then DDP's view."""
    img, txt = (t.requires_grad_() for t in _global_batch())
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    logits = scale * img @ txt.t()
    labels = torch.arange(sum(SIZES))
    per = (F.cross_entropy(logits, labels, reduction="none")
           + F.cross_entropy(logits.t(), labels, reduction="none")) / 2
    bounds = [0, SIZES[0], sum(SIZES)]
    losses = [per[bounds[r]:bounds[r + 1]].mean() for r in range(2)]
    d_img, d_txt, d_scale = torch.autograd.grad(sum(losses), (img, txt, scale))
    return [[losses[r].detach(), d_img[bounds[r]:bounds[r + 1]], d_txt[bounds[r]:bounds[r + 1]], d_scale / 2]
            for r in range(2)]


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_rank_losses, world=2)


def test_the_batch_really_overflows_fp32_without_a_shift():
    img, txt = _global_batch()
    col_lse = torch.logsumexp(SCALE * (img @ txt.t()), dim=0)
    assert col_lse.max() > 89  # exp(89) > fp32 max: an unshifted combination would give inf
    assert torch.isinf(torch.exp(col_lse.float())).any()


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS, ids=[b or "auto" for b in BACKENDS])
def test_global_clip_loss_at_scale_100_fp32_matches_float64(results, backend):
    expected = _expected()
    for rank in range(2):
        got = results[rank][backend]
        for name, g, w in zip(("loss", "d_image", "d_text", "d_scale"), got, expected[rank]):
            assert torch.isfinite(g).all(), f"rank {rank} {name}: {g}"
            # fp32 logits of size 100 carry ~1e-5 absolute error, so softmax weights ~1e-6 and the
            # gradients (scale x weights x features) ~1e-4: measured at most 2e-4 (materialised reference).
            torch.testing.assert_close(g.double(), w, atol=5e-4, rtol=1e-4,
                                       msg=lambda m, where=f"rank {rank} {name}": f"{where}: {m}")
