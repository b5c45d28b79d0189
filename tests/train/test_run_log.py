"""The trainers' run log (JSONL that survives a torn last line and resumes at a step, the loss plot) and
the progress bar's rate."""

from __future__ import annotations

import os

import pytest
import torch

from llm2clip_fast.train.run_log import JsonlLog, TrainProgress, plot_loss_curve, read_jsonl


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
