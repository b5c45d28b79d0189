"""Trainer checkpoints: bit-identical resume (model, optimizer, schedule and RNG streams), the newest
complete checkpoint found past incomplete ones, pruning, and a failed save leaving none. Checksums and
damage: test_checkpoint_integrity.py."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from _tiny_trainable import TinyModel, make_tiny, train_steps

from llm2clip_fast.train import checkpoint as ckpt


def _np_draw() -> float:
    return float(np.random.rand())  # noqa: NPY002 - the legacy global stream is what is checkpointed


def test_checkpoint_resume_is_bit_identical(tmp_path):
    model, opt, sched = make_tiny()
    train_steps(model, opt, sched, 3)
    random.random()
    _np_draw()
    ckpt.save_checkpoint(tmp_path, step=3, epoch=1, batch_index=7, model_state=model.state_dict(),
                         optimizer=opt, scheduler=sched, config={"lr": 1e-2, "name": "x"},
                         extra={"scale": 50.0, "ids": (1, 2), "inf": float("inf")})
    train_steps(model, opt, sched, 4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = (random.random(), _np_draw(), torch.rand(()).item())

    model2, opt2, sched2 = make_tiny(seed=123)  # different init: everything must come from the checkpoint
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
    train_steps(model2, opt2, sched2, 4)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert (random.random(), _np_draw(), torch.rand(()).item()) == expected_draws
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_latest_checkpoint_skips_incomplete_and_prunes(tmp_path):
    model = TinyModel()
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
    model = TinyModel()

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
