"""Retrieval metrics against hand-computed cases, and the eval sub-command on a tiny saved model."""

from __future__ import annotations

import pytest
import torch

from llm2clip_fast.train.retrieval_metrics import (
    caption_retrieval_accuracy,
    cosine_similarity_matrix,
    image_text_retrieval,
    topk_hit_rates,
    zero_shot_accuracy,
)


def test_topk_hand_computed():
    # Row 0: target 0 is best -> rank 1. Row 1: target 2 is beaten by two -> rank 3.
    # Row 2: target 1 beaten by one (0.9) -> rank 2.
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.8, 0.7, 0.1],
                        [0.9, 0.5, 0.1]])
    rates = topk_hit_rates(sim, torch.tensor([0, 2, 1]), (1, 2, 3))
    assert rates == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_ties_count_as_expected_random_tie_break():
    # Target tied with two negatives, beaten by none: P(top-1)=1/3, P(top-2)=2/3, P(top-3)=1.
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    rates = topk_hit_rates(sim, torch.tensor([1]), (1, 2, 3, 4))
    assert rates == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: 1.0})
    # Beaten by one and tied with one: rank 2 or 3.
    sim = torch.tensor([[0.9, 0.5, 0.5]])
    assert topk_hit_rates(sim, torch.tensor([2]), (1, 2, 3)) == pytest.approx({1: 0.0, 2: 0.5, 3: 1.0})


def test_collapsed_embeddings_score_chance_not_perfect():
    n = 8
    same = torch.ones(n, 4)
    out = image_text_retrieval(same, same, ks=(1, 5))
    assert out["i2t_R@1"] == pytest.approx(1 / n) and out["t2i_R@1"] == pytest.approx(1 / n)
    assert out["i2t_R@5"] == pytest.approx(5 / n)


def test_k_larger_than_gallery_finds_everything():
    sim = torch.tensor([[0.1, 0.9], [0.3, 0.2]])
    assert topk_hit_rates(sim, torch.tensor([0, 1]), (1, 10)) == pytest.approx({1: 0.0, 10: 1.0})


def test_image_text_retrieval_directions_differ():
    # Image 0 is closest to text 1 but text 0's closest image is image 0.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 1.2], [0.9, 1.0]])
    out = image_text_retrieval(img, txt, ks=(1,))
    sim = cosine_similarity_matrix(img, txt)
    i2t = (sim.argmax(1) == torch.arange(2)).float().mean().item()
    t2i = (sim.argmax(0) == torch.arange(2)).float().mean().item()
    assert out == pytest.approx({"i2t_R@1": i2t, "t2i_R@1": t2i})
    assert i2t != t2i


def test_cra_and_zero_shot():
    short = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    long = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.0]])
    assert caption_retrieval_accuracy(short, long) == pytest.approx(2 / 3)
    images = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.9, 0.0], [0.0, 1.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 1, 1])) == pytest.approx(3 / 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="paired"):
        image_text_retrieval(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dimension"):
        cosine_similarity_matrix(torch.zeros(3, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="targets"):
        topk_hit_rates(torch.zeros(2, 2), torch.tensor([0, 5]), (1,))
    with pytest.raises(ValueError, match="ks"):
        topk_hit_rates(torch.zeros(2, 2), torch.tensor([0, 1]), (0,))
    with pytest.raises(TypeError):
        image_text_retrieval([[1.0]], torch.zeros(1, 1))
