"""--report-to: csv for real, tensorboard and wandb through stand-in modules (neither package is
installed here), missing packages named up front, and a stage-2 run that reports to csv."""

from __future__ import annotations

import csv
import importlib.machinery
import sys
import types

import pytest
import torch

from llm2clip_fast.missing_dependency import MissingDependencyError
from llm2clip_fast.train.scalar_reporters import ScalarReporters, check_report_to


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_check_report_to():
    assert check_report_to(["none"]) == [] and check_report_to([]) == []
    assert check_report_to(["csv", "csv"]) == ["csv"]
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        check_report_to(["none", "csv"])
    with pytest.raises(ValueError, match="unknown"):
        check_report_to(["mlflow"])


@pytest.mark.parametrize("target,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_package_is_named_before_the_run(monkeypatch, target, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(MissingDependencyError, match=f"pip install {package}"):
        check_report_to(["csv", target])


def test_csv_reports_numbers_only_and_resume_drops_later_rows(tmp_path):
    rep = ScalarReporters(["csv"], tmp_path)
    for step in (1, 2, 3):
        rep.log({"step": step, "loss": torch.tensor(1.0 / step), "lr": 0.1, "phase": "contrastive",
                 "nan": float("nan"), "flag": True})
    rep.close()
    with open(tmp_path / "scalars.csv", "a") as f:
        f.write("4,lo")  # a row torn by a kill
    rows = _rows(tmp_path / "scalars.csv")
    assert rows[0] == ["step", "name", "value"]
    assert [r[:2] for r in rows[1:7]] == [[str(s), n] for s in (1, 2, 3) for n in ("loss", "lr")]
    assert float(rows[3][2]) == 0.5
    resumed = ScalarReporters(["csv"], tmp_path, resume_step=2)
    resumed.log({"step": 3, "loss": 9.0})
    resumed.close()
    assert [r[0] for r in _rows(tmp_path / "scalars.csv")[1:]] == ["1", "1", "2", "2", "3"]
    assert _rows(tmp_path / "scalars.csv")[-1] == ["3", "loss", "9.0"]


def _fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_tensorboard_gets_each_scalar_and_purges_on_resume(monkeypatch, tmp_path):
    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, global_step):
            calls.append((tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    _fake_module(monkeypatch, "tensorboard")
    _fake_module(monkeypatch, "torch.utils.tensorboard", SummaryWriter=Writer)
    rep = ScalarReporters(["tensorboard"], tmp_path, resume_step=4)
    rep.log({"step": 5, "loss": 0.5, "phase": "x"})
    rep.close()
    assert calls == [("init", str(tmp_path / "tensorboard"), 5), ("loss", 0.5, 5), ("close",)]


def test_wandb_is_offline_unless_configured_and_resume_keeps_the_run(monkeypatch, tmp_path):
    inits, logged = [], []

    class Run:
        def log(self, data, step):
            logged.append((data, step))

        def finish(self):
            logged.append("finish")

    def init(**kwargs):
        inits.append(kwargs)
        return Run()

    _fake_module(monkeypatch, "wandb", init=init)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    rep = ScalarReporters(["wandb"], tmp_path / "run", config={"lr": 0.1})
    rep.log({"step": 1, "loss": 2.0})
    rep.close()
    assert inits[0]["mode"] == "offline" and inits[0]["config"] == {"lr": 0.1}
    assert inits[0]["dir"] == str(tmp_path / "run") and logged == [({"loss": 2.0}, 1), "finish"]
    monkeypatch.setenv("WANDB_MODE", "online")
    ScalarReporters(["wandb"], tmp_path / "run", resume_step=1).close()
    assert "mode" not in inits[1] and inits[1]["id"] == inits[0]["id"] and inits[1]["resume"] == "allow"


def test_stage2_reports_to_csv(tmp_path):
    from _stage2_runs import make_demo, stage2_args

    from llm2clip_fast.train.__main__ import main as train_main

    demo = make_demo(tmp_path)
    run = tmp_path / "run"
    assert train_main(stage2_args(demo, run, "--report-to", "csv", steps=3)) == 0
    names = {r[1] for r in _rows(run / "scalars.csv")[1:]}
    assert "loss" in names and "lr" in names
    assert sorted({int(r[0]) for r in _rows(run / "scalars.csv")[1:]}) == [1, 2, 3]
