"""--config FILE for every sub-command, the shared flag vocabulary and its hidden old spellings."""

from __future__ import annotations

import json

import pytest

from llm2clip_fast.train.__main__ import cli, parse_args
from llm2clip_fast.train.cli.config_file import ConfigFileError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_json_config_sets_flags_and_the_command_line_wins(tmp_path):
    cfg = _write(tmp_path, "s2.json", json.dumps({
        "data": "d.jsonl", "out": "run", "lr": 0.25, "weight-decay": 0.1, "max_grad_norm": 2.0,
        "crop-scale": [0.5, 0.9], "loss": "siglip", "quiet": True, "steps": 7}))
    args = parse_args(["stage2", "--config", cfg, "--lr", "0.5"])
    assert args.lr == 0.5  # command line over file
    assert args.wd == 0.1 and args.grad_clip == 2.0 and args.steps == 7
    assert list(args.crop_scale) == [0.5, 0.9] and args.loss == "siglip" and args.no_progress is True
    assert args.data == "d.jsonl" and args.config == str((tmp_path / "s2.json").resolve())


def test_yaml_config_for_embed_and_stage1(tmp_path):
    cfg = _write(tmp_path, "e.yaml", "llm: m\ndata: d.jsonl\nout: cache\nbatch_size: 3\nquiet: true\n")
    args = parse_args(["embed", f"--config={cfg}"])
    assert (args.llm, args.batch_size, args.quiet) == ("m", 3, True)
    cfg1 = _write(tmp_path, "s1.yml", "llm: m\ndata: d\nout: o\nrecipe: llm2clip\nlr: 1.0e-3\n")
    args1 = parse_args(["stage1", "--config", cfg1])
    from llm2clip_fast.train.cli.recipes import resolve_recipe

    origin = resolve_recipe(args1)
    # the file's lr counts as given: the recipe fills the rest, not lr
    assert args1.lr == 1e-3 and origin["lr"] == "flag"
    assert args1.lora_r == 16 and origin["warmup_steps"] == "recipe" and args1.warmup_steps == 300


def test_old_spellings_still_work_and_are_hidden(tmp_path, capsys):
    args = parse_args(["stage2", "--data", "d", "--out", "o", "--wd", "0.2", "--warmup", "3",
                       "--grad-clip", "0.5", "--no-progress"])
    assert (args.wd, args.warmup, args.grad_clip, args.no_progress) == (0.2, 3, 0.5, True)
    defaults = parse_args(["stage2", "--data", "d", "--out", "o"])
    got = (defaults.wd, defaults.warmup, defaults.grad_clip, defaults.no_progress)
    assert got == (0.05, None, 1.0, False)
    with pytest.raises(SystemExit):
        parse_args(["stage2", "--help"])
    help_text = capsys.readouterr().out
    for new in ("--weight-decay", "--warmup-steps", "--max-grad-norm", "--quiet", "--config FILE"):
        assert new in help_text
    for old in ("--wd ", "--grad-clip", "--no-progress"):
        assert old not in help_text
    assert "(default: 0.05)" in help_text  # --help shows defaults


@pytest.mark.parametrize("content,match", [
    ('{"data": "d", "out": "o", "learning_rate": 1}', "'learning_rate' is not a flag"),
    ('{"data": "d", "out": "o", "quiet": "yes"}', "switch; give true or false"),
    ('{"data": "d", "out": "o", "steps": null}', "no value"),
    ('{"data": "d", "out": "o", "lr": [1, 2]}', "takes one value"),
    ('[1, 2]', "expected a mapping"),
    ('{"data": ', "not valid JSON"),
])
def test_bad_config_files_name_the_problem(tmp_path, content, match):
    cfg = _write(tmp_path, "bad.json", content)
    with pytest.raises(ConfigFileError, match=match):
        parse_args(["stage2", "--config", cfg])


def test_bad_config_exits_2_and_a_missing_one_3(tmp_path, capsys):
    cfg = _write(tmp_path, "bad.json", '{"data": "d", "out": "o", "nope": 1}')
    assert cli(["stage2", "--config", cfg]) == 2
    assert "'nope' is not a flag" in capsys.readouterr().err
    assert cli(["stage2", "--config", str(tmp_path / "missing.yaml")]) == 3
    with pytest.raises(SystemExit) as exc:  # a value the flag refuses: argparse's own usage error
        bad_choice = _write(tmp_path, "c.json", '{"data": "d", "out": "o", "loss": "x"}')
        parse_args(["stage2", "--config", bad_choice])
    assert exc.value.code == 2


def test_config_suffix_must_be_json_or_yaml(tmp_path):
    cfg = _write(tmp_path, "c.toml", "lr = 1")
    with pytest.raises(ConfigFileError, match=r"\.json, \.yaml or \.yml"):
        parse_args(["stage2", "--config", cfg])
