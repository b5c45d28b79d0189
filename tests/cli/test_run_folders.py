"""A run folder is never overwritten by accident: a non-empty ``--out`` without ``--resume`` is an error
naming what is there, ``--overwrite`` starts over and says what it removed, pruning touches only the
current run's checkpoints, and leftovers of a killed save are cleaned at the next start."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from _stage2_runs import make_demo, stage2_args

from llm2clip_fast.train import checkpoint as ckpt
from llm2clip_fast.train import stage1
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.run_folder import RunFolderError, prepare_run_folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("run_folders"))


def test_stage2_refuses_a_finished_run_then_overwrite_starts_over(demo, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(stage2_args(demo, out, "--save-every", "1", steps=3)) == 0
    before = {name: (out / name).read_bytes() for name in ("log.jsonl", "summary.json", "config.json")}
    old_ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())

    listing = r"already holds a run \(.*checkpoints/.*log\.jsonl.*model/"
    with pytest.raises(RunFolderError, match=listing) as e:
        train_main(stage2_args(demo, out, "--save-every", "1", steps=2))
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing touched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == old_ckpts

    with pytest.raises(ValueError, match="give one, not both"):
        train_main(stage2_args(demo, out, "--resume", "--overwrite", steps=3))

    capsys.readouterr()
    assert train_main(stage2_args(demo, out, "--overwrite", "--save-every", "1", steps=2)) == 0
    said = capsys.readouterr().err  # status lines are logged to stderr
    assert "--overwrite: removing" in said and "checkpoints/" in said and "log.jsonl" in said
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_stage2_accepts_an_empty_existing_folder(demo, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert train_main(stage2_args(demo, out, "--save-every", "0", steps=1)) == 0


def test_stage1_refuses_a_non_empty_folder_before_loading_anything(tmp_path):
    out = tmp_path / "s1"
    out.mkdir()
    (out / "config.json").write_text("{}")
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    args = parser.parse_args(["--llm", str(tmp_path / "no-llm"), "--data", str(tmp_path / "no-data.csv"),
                              "--out", str(out), "--batch-size", "8", "--quiet"])
    with pytest.raises(RunFolderError, match=r"config\.json"):
        stage1.train_stage1(args)
    args.resume, args.overwrite = True, True
    with pytest.raises(ValueError, match="give one, not both"):
        stage1.train_stage1(args)


def test_pruning_only_touches_checkpoints_of_the_current_run(tmp_path):
    state = {"w": torch.ones(3)}
    for step in (10, 20):
        ckpt.save_checkpoint(tmp_path, step=step, epoch=0, batch_index=0, model_state=state, run_id="old",
                             keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020"]
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step=step, epoch=0, batch_index=0, model_state=state, run_id="new",
                             keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003",
                                                                  "step_00000020"]
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(tmp_path, 3)).run_id == "new"


def test_leftover_temporaries_of_a_killed_save_are_removed_and_reported(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step_00000006-dead").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step_00000006-dead" / "model.safetensors").write_bytes(b"partial")
    (out / ".tmp-merged-1234").mkdir()
    (out / ".log.jsonl.ab12.tmp").write_text("torn")
    (out / "checkpoints" / "step_00000004").mkdir()
    said: list[str] = []
    prepare_run_folder(out, resume=True, overwrite=False, say=said.append)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    assert len(said) == 1 and ".tmp-step_00000006-dead" in said[0] and ".tmp-merged-1234" in said[0]
    # A folder holding only such leftovers is not a run: a fresh start may use it.
    (out / "checkpoints" / "step_00000004").rmdir()
    (out / "checkpoints").rmdir()
    (out / ".tmp-x").mkdir()
    prepare_run_folder(out, resume=False, overwrite=False, say=said.append)
    assert list(out.iterdir()) == []


def test_another_ranks_write_probe_is_not_a_run(tmp_path, monkeypatch):
    """Under torchrun every rank probes --out (writable_output.check_writable) while rank 0 checks that the
    folder holds no run: a probe standing there for that instant is neither a run nor something --overwrite
    removes (the rank that made it removes it, and must find it). Seen as a failed two-rank stage 2 in CI."""
    from llm2clip_fast.train.run_folder import check_run_folder
    from llm2clip_fast.writable_output import WRITE_PROBE_PREFIX, check_writable

    out = tmp_path / "run"
    out.mkdir()
    probe = out / f"{WRITE_PROBE_PREFIX}ab12cd"
    probe.write_bytes(b"")
    check_run_folder(out, resume=False, overwrite=False)
    said: list[str] = []
    prepare_run_folder(out, resume=False, overwrite=True, say=said.append)
    assert probe.exists() and said == []
    (out / "log.jsonl").write_text("{}")
    with pytest.raises(RunFolderError, match=r"log\.jsonl"):
        check_run_folder(out, resume=False, overwrite=False)
    # The probing rank tolerates its probe having gone (removed by anything else in the meantime).
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_gone(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        Path(name).unlink()
        return fd, name

    monkeypatch.setattr("llm2clip_fast.writable_output.tempfile.mkstemp", mkstemp_then_gone)
    assert check_writable(out, flag="--out", folder=True) == out
