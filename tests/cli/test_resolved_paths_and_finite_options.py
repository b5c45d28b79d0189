"""Issue 28, item 6: ``--resume`` compares where the data paths lead, not how they are spelled; non-finite
real options are refused up front, each error naming its flag."""

from __future__ import annotations

import os

import pytest
from _stage2_runs import final_state, logged_losses, make_demo, stage2_args, stop_stage2_in_step

from llm2clip_fast.train.__main__ import cli
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.run_spine import check_resume_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("resolved_paths"))


def test_resume_accepts_the_same_files_by_another_spelling(demo, tmp_path, monkeypatch):
    root = demo["root"]
    monkeypatch.chdir(root)
    relative = {"data": os.path.relpath(demo["data"]), "cache": os.path.relpath(demo["cache"])}
    assert not os.path.isabs(relative["data"])
    args = ("--save-every", "1")
    stop_stage2_in_step(monkeypatch, stage2_args(relative, tmp_path / "run", *args, steps=3), 3)
    link = tmp_path / "linked-cache"
    link.symlink_to(demo["cache"])
    absolute = {"data": demo["data"].resolve(), "cache": link}
    monkeypatch.chdir(tmp_path)  # another working directory: the relative spelling would lead elsewhere
    assert train_main(stage2_args(absolute, tmp_path / "run", *args, "--resume", steps=3)) == 0
    assert train_main(stage2_args(absolute, tmp_path / "full", *args, steps=3)) == 0
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "full")
    a, b = final_state(tmp_path / "run"), final_state(tmp_path / "full")
    assert all(a[k].equal(b[k]) for k in a)


def test_resume_still_refuses_other_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    saved = {"data": "a.jsonl", "resolved_paths": {"data": str(tmp_path / "a.jsonl")}}
    check_resume_config(saved, {"data": str(tmp_path / "a.jsonl")}, ("data",), checkpoint="ck")
    with pytest.raises(ValueError, match=r"data: 'a.jsonl' in the checkpoint, '.*b.jsonl' now"):
        check_resume_config(saved, {"data": str(tmp_path / "b.jsonl")}, ("data",), checkpoint="ck")


def test_resolved_spec_handles_patterns_joined_specs_urls_and_hub_names(tmp_path, monkeypatch):
    from llm2clip_fast.train.run_spine import resolved_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    assert resolved_spec("d/x-{000..009}.tar") == str(tmp_path / "d" / "x-{000..009}.tar")
    assert resolved_spec("x-{0..3}.tar::d/*.tar") == f"{tmp_path}/x-{{0..3}}.tar::{tmp_path}/d/*.tar"
    assert resolved_spec("https://u:p@h/x.tar?sig=1") == "https://***@h/x.tar?sig=***"
    assert resolved_spec("org/some-model") == "org/some-model"  # not a local path: as given


@pytest.mark.parametrize(("flag", "value"), [
    ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "nan"), ("--max-grad-norm", "nan"),
    ("--max-grad-norm", "inf"), ("--beta2", "nan"), ("--min-lr-ratio", "inf"), ("--epochs", "inf"),
])
def test_stage2_refuses_a_non_finite_option_naming_it(demo, tmp_path, capsys, flag, value):
    argv = [a for a in stage2_args(demo, tmp_path / "run") if a not in ("--steps", "4")] \
        if flag == "--epochs" else stage2_args(demo, tmp_path / "run")
    assert cli([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must be a finite number, got {value}" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_stage2_refuses_a_negative_max_grad_norm(demo, tmp_path, capsys):
    assert cli([*stage2_args(demo, tmp_path / "run"), "--max-grad-norm", "-1"]) == 2
    assert "--max-grad-norm must be >= 0 (0: no clipping), got -1.0" in capsys.readouterr().err


def test_stage1_refuses_a_non_finite_or_negative_max_grad_norm(capsys):
    from llm2clip_fast.train.__main__ import parse_args
    from llm2clip_fast.train.stage1 import check_options

    base = ["stage1", "--llm", "x", "--data", "y", "--out", "z"]
    with pytest.raises(ValueError, match="--max-grad-norm must be finite, got nan"):
        check_options(parse_args([*base, "--max-grad-norm", "nan"]))
    with pytest.raises(ValueError, match=r"--max-grad-norm must be >= 0 \(0: no clipping\), got -2.0"):
        check_options(parse_args([*base, "--max-grad-norm", "-2"]))
    with pytest.raises(ValueError, match="--lr must be finite, got inf"):
        check_options(parse_args([*base, "--lr", "inf"]))
