"""Shared trainer infrastructure: checkpoints, optimizer groups and schedules, LLRD, run log."""

from __future__ import annotations

import itertools
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from llm2clip_fast.train import checkpoint as ckpt
from llm2clip_fast.train.optim import (
    WarmupSchedule,
    adamw_param_groups,
    build_scheduler,
    clip_grad_norm,
    is_no_decay,
)
from llm2clip_fast.train.run_log import JsonlLog, TrainProgress, plot_loss_curve, read_jsonl


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched, n: int) -> None:
    for _ in range(n):
        x = torch.randn(4, 5)
        y = model.out(model.norm(model.lin(x))).square().mean() * model.logit_scale
        opt.zero_grad()
        y.backward()
        opt.step()
        sched.step()


def _np_draw() -> float:
    return float(np.random.rand())  # noqa: NPY002 - the legacy global stream is what is checkpointed


def _make(seed: int = 0):
    torch.manual_seed(seed)
    model = _Tiny()
    opt = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 0.1, lr=1e-2))
    sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=10)
    return model, opt, sched


def test_checkpoint_resume_is_bit_identical(tmp_path):
    model, opt, sched = _make()
    _train_steps(model, opt, sched, 3)
    random.random()
    _np_draw()
    ckpt.save_checkpoint(tmp_path, step=3, epoch=1, batch_index=7, model_state=model.state_dict(),
                         optimizer=opt, scheduler=sched, config={"lr": 1e-2, "name": "x"},
                         extra={"scale": 50.0, "ids": (1, 2), "inf": float("inf")})
    _train_steps(model, opt, sched, 4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = (random.random(), _np_draw(), torch.rand(()).item())

    model2, opt2, sched2 = _make(seed=123)  # different init: everything must come from the checkpoint
    loaded = ckpt.load_checkpoint(tmp_path)
    assert (loaded.step, loaded.epoch, loaded.batch_index) == (3, 1, 7)
    assert loaded.config == {"lr": 1e-2, "name": "x"}
    assert loaded.extra["ids"] == (1, 2) and loaded.extra["scale"] == 50.0
    assert math.isinf(loaded.extra["inf"])
    model2.load_state_dict(loaded.model_state)
    opt2.load_state_dict(loaded.optimizer_state)
    sched2.load_state_dict(loaded.scheduler_state)
    ckpt.restore_rng_state(loaded.rng)
    # The RNG streams continue where the checkpoint left them (torch draws were consumed by training).
    _train_steps(model2, opt2, sched2, 4)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert (random.random(), _np_draw(), torch.rand(()).item()) == expected_draws
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_latest_checkpoint_skips_incomplete_and_prunes(tmp_path):
    model = _Tiny()
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step=step, epoch=0, batch_index=step,
                             model_state=model.state_dict(), keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000004"]
    # A crash mid-write leaves a temp folder and possibly a step folder without meta.json.
    (tmp_path / "checkpoints" / ".tmp-step_00000009-dead").mkdir()
    broken = tmp_path / "checkpoints" / "step_00000008"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"
    # Saving the same step again replaces it whole.
    ckpt.save_checkpoint(tmp_path, step=4, epoch=2, batch_index=0, model_state=model.state_dict(),
                         keep_last=2)
    assert ckpt.load_checkpoint(tmp_path).epoch == 2
    assert not any(p.name.startswith(".old-") for p in (tmp_path / "checkpoints").iterdir())


def test_checkpoint_save_failure_leaves_no_checkpoint(tmp_path):
    model = _Tiny()

    class Bad:
        def state_dict(self):
            return {"fn": print}

    with pytest.raises(TypeError, match="cannot store"):
        ckpt.save_checkpoint(tmp_path, step=1, epoch=0, batch_index=0, model_state=model.state_dict(),
                             scheduler=Bad())
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert list((tmp_path / "checkpoints").iterdir()) == []
    with pytest.raises(ValueError, match="step"):
        ckpt.save_checkpoint(tmp_path, step=-1, epoch=0, batch_index=0, model_state={})


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
    model, opt, sched = _make()
    _train_steps(model, opt, sched, 3)
    state = json.loads(json.dumps(sched.state_dict()))  # plain data, no functions
    _, opt2, sched2 = _make()
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
    model = _Tiny()
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


def test_jsonl_log_resume_and_plot(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    with JsonlLog(path) as log:
        for step in range(1, 6):
            log.log({"step": step, "loss": 1.0 / step, "lr": torch.tensor(0.1 * step)})
        log.log({"step": 6, "loss": float("nan")})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 7, "lo')  # torn line from a kill
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5, 6]
    assert read_jsonl(path)[-1]["loss"] == "nan"
    with JsonlLog(path, resume_step=3) as log:
        log.log({"step": 4, "loss": 0.2})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    png = plot_loss_curve(path, tmp_path / "run" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no records"):
        plot_loss_curve(path, tmp_path / "x.png", key="missing")
    disabled = JsonlLog(tmp_path / "other.jsonl", enabled=False)
    disabled.log({"step": 1})
    assert not os.path.exists(tmp_path / "other.jsonl")


def test_progress_reports_rate(monkeypatch):
    from llm2clip_fast.train import run_log

    clock = iter([100.0, 100.5, 101.0, 102.0, 104.0, 108.0])  # a fake perf_counter, one read per update
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: next(clock))
    with TrainProgress(5, enabled=False, unit_name="captions", window=3) as bar:
        rates = [bar.update(n, loss=1.0, lr=1e-3) for n in (8, 8, 16, 4, 4)]
    # (time, items so far) entries: (100, 0) (100.5, 8) (101, 16) (102, 32) (104, 36) (108, 40); the rate
    # spans the last 3: 8/0.5, 16/1, (32-8)/1.5, (36-16)/3, (40-32)/6.
    assert rates == pytest.approx([16.0, 16.0, 16.0, 20 / 3, 8 / 6])
