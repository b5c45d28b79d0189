"""torch.distributed helpers and the global-batch contrastive losses."""

from __future__ import annotations

import functools

import _distributed_loss_rank as worker
import pytest
import torch
import torch.nn.functional as F
from _ranks import run_on_ranks

from llm2clip_fast import distributed as D


def test_single_process_answers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed_from_env() is False
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    D.barrier()
    D.destroy_distributed()


def test_init_refuses_incomplete_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK"):
        D.init_distributed_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_distributed_from_env()


@pytest.mark.parametrize("n,world", [(0, 1), (10, 3), (7, 7), (5, 8)])
def test_shard_indices_cover_once_in_order(n, world):
    shards = [D.shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_indices_bad_input():
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        D.shard_indices(4, 0, 0)


# ---- global-batch losses across processes (gloo) --------------------------------------------------

WORKER_TIMEOUT_S = 240


def _run_ranks(world: int) -> list[dict]:
    """Every case on ``world`` gloo ranks; a hang or a crash fails the test instead of blocking CI."""
    return run_on_ranks(functools.partial(worker.rank_results, world=world), world=world,
                        timeout_s=WORKER_TIMEOUT_S)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def _expected_clip(sizes, reduction, world):
    """OpenCLIP ClipLoss(local_loss=True, gather_with_grad=True) per rank, from the concatenated batch.

    L_r = reduce over rank r's samples of (CE(image_i vs all texts) + CE(text_i vs all images)) / 2.
    Feature grads of rank r: d(sum_q <g_q, L_q>)/d(features_r); scale grad: the rank average.
    """
    img, txt = worker.global_batch(sizes, 6, seed=11)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    logits = scale * img @ txt.t()
    labels = torch.arange(sum(sizes))
    per = (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.t(), labels,
                                                                               reduction="none")) / 2
    bounds = [sum(sizes[:r]) for r in range(world + 1)]
    losses = [_reduce(per[bounds[r]:bounds[r + 1]], reduction) for r in range(world)]
    total = sum((worker.upstream(reduction, r, sizes[r]) * losses[r]).sum() for r in range(world))
    d_img, d_txt, d_scale = torch.autograd.grad(total, (img, txt, scale))
    return [[losses[r].detach(), d_img[bounds[r]:bounds[r + 1]], d_txt[bounds[r]:bounds[r + 1]],
             d_scale / world] for r in range(world)]


def _expected_siglip(sizes, reduction, world):
    """OpenCLIP SigLipLoss per rank, from the concatenated batch.

    L_r = sum over rank r's images i and all texts j of softplus(-y_ij z_ij), / B_r for 'mean'.
    Image grads: <g_r, dL_r/d image_r>; text grads of rank r: d(sum_q <g_q, L_q>)/d text_r;
    scale and bias: rank r's own <g_r, dL_r/d(.)>.
    """
    img, txt = worker.global_batch(sizes, 6, seed=11)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    z = scale * img @ txt.t() + bias
    y = 2 * torch.eye(sum(sizes), dtype=torch.float64) - 1
    rows = -F.logsigmoid(y * z).sum(dim=1)
    bounds = [sum(sizes[:r]) for r in range(world + 1)]
    losses = []
    for r in range(world):
        part = rows[bounds[r]:bounds[r + 1]]
        losses.append(part.sum() / sizes[r] if reduction == "mean" else _reduce(part, reduction))
    weighted = [(worker.upstream(reduction, r, sizes[r]) * losses[r]).sum() for r in range(world)]
    d_img, d_txt = torch.autograd.grad(sum(weighted), (img, txt), retain_graph=True)
    out = []
    for r in range(world):
        d_scale, d_bias = torch.autograd.grad(weighted[r], (scale, bias), retain_graph=True)
        out.append([losses[r].detach(), d_img[bounds[r]:bounds[r + 1]], d_txt[bounds[r]:bounds[r + 1]],
                    d_scale, d_bias])
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def rank_results(request):
    world = request.param
    return world, _run_ranks(world)


@pytest.mark.distributed
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_global_losses_match_single_process_on_concatenated_batch(rank_results, loss_name):
    world, results = rank_results
    names = ("loss", "d_image", "d_text", "d_scale", "d_bias")
    for case in worker.cases(world):
        expected_fn = _expected_clip if loss_name == "clip" else _expected_siglip
        expected = expected_fn(case["sizes"], case["reduction"], world)
        for r in range(world):
            got = results[r][(case["name"], loss_name)]
            assert len(got) == len(expected[r])
            for name, g, w in zip(names, got, expected[r]):
                where = f"{case['name']} rank {r} {name}"
                torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=2e-5,
                                           msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.distributed
def test_paths_taken_over_the_ranks(rank_results):
    world, results = rank_results
    for r in range(world):
        assert results[r][("equal_mean", "clip", "path")] == "keep-logits"
        assert results[r][("equal_mean_recompute", "clip", "path")] == "recompute"
        assert results[r][("equal_mean", "siglip", "path")] == "one-pass"
        assert results[r][("unequal_none", "siglip", "path")] == "two-pass"


@pytest.mark.distributed
def test_global_clip_loss_equals_open_clip_local_loss_gather_with_grad(rank_results):
    # Per rank: OpenCLIP's loss and feature gradients exactly; its logit_scale gradient is rank r's own,
    # ours the rank average (what DDP's averaging makes of OpenCLIP's, see clip_loss_global).
    world, results = rank_results
    theirs = [results[r][("open_clip_check", "open_clip")] for r in range(world)]
    mean_d_scale = sum(t[3] for t in theirs) / world
    for r in range(world):
        for path in ("ours_keep", "ours_recompute"):
            ours = results[r][("open_clip_check", path)]
            for name, got, want in zip(("loss", "d_image", "d_text"), ours[:3], theirs[r][:3]):
                where = f"rank {r} {path} {name}"
                torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5,
                                           msg=lambda m, where=where: f"{where}: {m}")
            torch.testing.assert_close(ours[3], mean_d_scale, atol=2e-6, rtol=2e-5)


@pytest.mark.distributed
def test_clip_loss_module_with_world_size(rank_results):
    world, results = rank_results
    sizes = worker.cases(world)[0]["sizes"]
    expected = _expected_clip(sizes, "mean", world)
    for r in range(world):
        got = results[r][("module", "clip")][0].double()
        torch.testing.assert_close(got, expected[r][0], atol=2e-5, rtol=2e-5)


def test_distributed_loss_without_process_group_raises():
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.siglip_loss import siglip_loss

    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="not initialised"):
        clip_loss(x, x, 2.0, distributed=True)
    with pytest.raises(RuntimeError, match="not initialised"):
        siglip_loss(x, x, 2.0, 0.0, distributed=True)
