"""Status messages go through logging: stderr from rank 0 only, warnings from any rank; results on stdout."""

from __future__ import annotations

import logging

from llm2clip_fast.train.cli.cli_logging import ROOT_LOGGER, setup_cli_logging


def test_rank_0_logs_everything_other_ranks_only_warnings(monkeypatch, capsys):
    setup_cli_logging()
    setup_cli_logging()  # idempotent: one handler, one line per message
    log = logging.getLogger(f"{ROOT_LOGGER}.train.stage2")
    monkeypatch.setenv("RANK", "0")
    log.info("stage2: hello %d", 1)
    monkeypatch.setenv("RANK", "3")
    log.info("stage2: not from rank 3")
    log.warning("stage2: careful")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["stage2: hello 1", "[rank 3] stage2: careful"]
    handlers = [h for h in logging.getLogger(ROOT_LOGGER).handlers if h.get_name() == "llm2clip_fast.cli"]
    assert len(handlers) == 1


def test_train_command_logs_status_to_stderr_and_results_to_stdout(tmp_path, capsys):
    from _stage2_runs import make_demo, stage2_args

    from llm2clip_fast.train.__main__ import main

    demo = make_demo(tmp_path)
    assert main(stage2_args(demo, tmp_path / "run", steps=1)) == 0
    captured = capsys.readouterr()
    assert "stage2: 1 steps in" in captured.err and "stage2:" not in captured.out
