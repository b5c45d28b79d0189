"""Optimizer set-up of the trainers: warm-up schedules (shape, bad options, state round trip), AdamW
parameter groups (no-decay names, per-parameter learning-rate multipliers as LLRD uses them) and
gradient-norm clipping."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from _tiny_trainable import TinyModel, make_tiny, train_steps
from torch import nn

from llm2clip_fast.train.optim import WarmupSchedule, adamw_param_groups, clip_grad_norm, is_no_decay


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_shape(kind):
    s = WarmupSchedule(kind, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind]
    assert s(14) == pytest.approx(end) and s(100) == pytest.approx(end)
    mid = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[kind]
    assert s(9) == pytest.approx(mid)
    values = [s(i) for i in range(4, 20)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_schedule_rejects_bad_options():
    with pytest.raises(ValueError, match="schedule must be one of"):
        WarmupSchedule("step", 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupSchedule("cosine", 0, 0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupSchedule("cosine", 0, 10, min_lr_ratio=2.0)


def test_scheduler_state_dict_round_trip():
    model, opt, sched = make_tiny()
    train_steps(model, opt, sched, 3)
    state = json.loads(json.dumps(sched.state_dict()))  # plain data, no functions
    _, opt2, sched2 = make_tiny()
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 3 and sched2.lr_lambdas[0].kind == "cosine"
    # The restored schedule continues with the original's learning rates (cosine, 2 warmup of 10).
    shape = WarmupSchedule("cosine", warmup_steps=2, total_steps=10)
    for step in range(4, 11):
        sched.step()
        sched2.step()
        assert sched.get_last_lr()[0] == pytest.approx(1e-2 * shape(step), rel=1e-12), step
        assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * shape(step), rel=1e-12), step


def test_param_groups_decay_and_multipliers():
    model = TinyModel()
    assert is_no_decay("encoder.layers.0.layer_norm1.weight", torch.zeros(3, 3))
    assert is_no_decay("blocks.0.ln_1.weight", torch.zeros(3, 3))
    assert not is_no_decay("encoder.layers.0.mlp.fc1.weight", torch.zeros(3, 3))
    model.out.weight.requires_grad_(False)
    groups = adamw_param_groups(model.named_parameters(), 0.2, lr=1.0,
                                lr_multipliers={"lin.weight": 0.5, "lin.bias": 0.5})
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert "out.weight" not in by_name
    assert by_name["lin.weight"]["weight_decay"] == 0.2 and by_name["lin.weight"]["lr"] == 0.5
    assert by_name["lin.bias"]["weight_decay"] == 0.0 and by_name["lin.bias"]["lr"] == 0.5
    for n in ("norm.weight", "norm.bias", "out.bias", "logit_scale"):
        assert by_name[n]["weight_decay"] == 0.0 and by_name[n]["lr"] == 1.0
    with pytest.raises(ValueError, match="no trainable"):
        adamw_param_groups([], 0.1, lr=1.0)


def test_clip_grad_norm():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert clip_grad_norm([p], None) == pytest.approx(6.0)
    assert clip_grad_norm([p], 1.5) == pytest.approx(6.0)
    assert p.grad.norm().item() == pytest.approx(1.5, rel=1e-5)
